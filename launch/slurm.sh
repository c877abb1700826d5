#!/usr/bin/env bash
# The study on a SLURM cluster, one array task per shard of the grid; the arguments after the script
# are the study's (python -m stages.study --help), after the defaults --seeds 0,1,2 --protocol best:
#   REPO=git@host:lab/transfer.git COMMIT=abc123 sbatch --array=1-4 launch/slurm.sh
#   REPO=... COMMIT=... sbatch --array=1-8 launch/slurm.sh --models alexnet --seeds 0,1 -S data.image_size=96
# Then, anywhere: python -m stages.study.report --remote origin
# The requests below suit CPU nodes. On GPU nodes, give each task a GPU and CPUs to feed it, on the
# sbatch line (or as "#SBATCH --gpus=1" below; --gres=none on the sbatch line does not undo that line):
#   sbatch --array=1-4 --gpus=1 --cpus-per-task=8 --mem=32G launch/slurm.sh
# and, where the nodes have fewer CPUs or less memory than asked for below, ask for less:
#   sbatch --array=1-2 --gpus=0 --cpus-per-task=1 --mem=2G launch/slurm.sh ...   # what CI runs (tests/test_slurm.py)
# Expects:
# - REPO: the git remote (origin) that every node can push to; COMMIT: the commit that every task runs
#   (default main: pin it, or a push to main while the array waits gives later tasks another grid).
# - A default DVC remote in the committed .dvc/config at an absolute URL every node reaches (s3://, ssh://,
#   or a shared folder); its credentials in the environment (sbatch passes the submitting shell's on).
# - VENV (optional): a virtualenv with requirements.txt installed, on a file system every node sees; else
#   the environment active at sbatch time if its python has dvc and torch; else each task installs one
#   with ./venv.sh (minutes, and gigabytes of torch wheels per task).
# - DVC_CACHE (optional): a shared cache folder on a cluster file system, so that the nodes link
#   prepare-data's arrays and the feature caches instead of copying them.
# Each task clones into its own folder under TMPDIR and removes it when it ends, failed or not: its
# results are on the remotes. A task with no cell (more tasks than cells) says so and ends with 0.
# The shard comes from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; the study says so in its first line.
#SBATCH --job-name=transfer-study
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=transfer-study-%A_%a.log
set -euo pipefail
: "${REPO:?set REPO to the git URL of the project}"
if [ -n "${VENV:-}" ]; then
  [ -x "$VENV/bin/dvc" ] || { echo "error: VENV=$VENV has no bin/dvc: install requirements.txt there, or unset VENV" >&2; exit 2; }
  export PATH="$VENV/bin:$PATH"
  run=""
elif python -c "import dvc, torch" 2>/dev/null && command -v dvc >/dev/null; then
  run=""  # the environment active at sbatch time (sbatch passes PATH on)
else
  run="./venv.sh"
fi
work="${TMPDIR:-/tmp}/transfer-study-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}-${SLURM_ARRAY_TASK_ID:-0}"
cleanup() {
  # DVC's queue workers outlive the study by seconds, writing under .dvc/tmp: stopped, then waited for
  # (each one's .json there gets its returncode once it has exited)
  if [ -d "$work/.dvc" ]; then
    (cd "$work" && $run dvc queue stop --kill >/dev/null 2>&1) || true
    for _ in $(seq 60); do
      [ -z "$(grep -L '"returncode": -\?[0-9]' "$work"/.dvc/tmp/exps/celery/*.json 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  cd / && rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM  # scancel or the time limit: the EXIT trap still runs
git clone --quiet "$REPO" "$work"
cd "$work"
git checkout --quiet "${COMMIT:-main}"
if [ -z "$(git config user.email)" ]; then  # the study commits and pushes experiments; a node may have no identity
  git config user.email "transfer-study@$(hostname)"
  git config user.name "transfer-study"
fi
if [ -n "${DVC_CACHE:-}" ]; then
  $run dvc config --local cache.dir "$DVC_CACHE"
  $run dvc config --local cache.shared group
  $run dvc config --local cache.type "hardlink,symlink,copy"
fi
$run python -m stages.study --seeds 0,1,2 --protocol best --remote origin "$@"
