#!/usr/bin/env bash
# The study on a SLURM cluster, one array task per shard of the grid:
#   sbatch --array=1-4 launch/slurm.sh                       # 4 shards; each runs its cells and pushes them
#   REPO=git@host:lab/transfer.git COMMIT=abc123 SEEDS=0,1,2 sbatch --array=1-4 launch/slurm.sh
# Then, anywhere: python -m stages.study.report --remote origin
# Expects:
# - REPO: the git remote (origin) that every node can push to; COMMIT: the commit that every task runs
#   (default main: pin it, or a push to main while the array waits gives later tasks another grid).
# - A default DVC remote in the committed .dvc/config at an absolute URL every node reaches (s3://, ssh://,
#   or a shared folder); its credentials in .dvc/config.local or the environment.
# - DVC_CACHE (optional): a shared cache folder on a cluster file system, so that the nodes link
#   prepare-data's arrays and the feature caches instead of copying them.
# The shard comes from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; the study says so in its first line.
#SBATCH --job-name=transfer-study
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=transfer-study-%A_%a.log
set -euo pipefail
: "${REPO:?set REPO to the git URL of the project}"
work="${TMPDIR:-/tmp}/transfer-study-${SLURM_ARRAY_JOB_ID}-${SLURM_ARRAY_TASK_ID}"
git clone --quiet "$REPO" "$work"
cd "$work"
git checkout --quiet "${COMMIT:-main}"
if [ -n "${DVC_CACHE:-}" ]; then
  ./venv.sh dvc config --local cache.dir "$DVC_CACHE"
  ./venv.sh dvc config --local cache.shared group
  ./venv.sh dvc config --local cache.type "hardlink,symlink,copy"
fi
./venv.sh python -m stages.study --seeds "${SEEDS:-0,1,2}" --protocol "${PROTOCOL:-best}" --remote origin
