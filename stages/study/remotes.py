"""The study across machines: git and DVC remotes, experiment names, and the shard a scheduler gives.

    python -m stages.study --shard 1/2 --remote origin    # on one machine; --shard 2/2 on another
    sbatch --array=1-4 launch/slurm.sh                    # the shard from SLURM_ARRAY_TASK_ID

`dvc exp push` and `dvc exp pull` exit 0 when an experiment of the same name diverged, and print
"No experiments to push" when there was nothing to push; so their words are read, not only their
exit code. Both move the run-cache too (`--run-cache`), so that another machine restores a stage
already run here instead of computing it again.
"""
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

from configobj import ConfigObj  # DVC's own config reader

from stages.pipeline.errors import UserError
from stages.study.experiments import DvcFailed, dvc_output
from stages.study.protocols import strategy_of

CONFIGS = (Path(".dvc/config.local"), Path(".dvc/config"))


def check(remote: str) -> None:
    """The git remote exists and a default DVC remote is set, at a URL that `dvc exp push` resolves."""
    try:
        subprocess.run(["git", "remote", "get-url", remote], check=True, capture_output=True)
    except subprocess.CalledProcessError:
        raise UserError(f"--remote {remote}: no such git remote: add it with `git remote add {remote} URL`") from None
    name = _config_value("core", "remote")
    if not name:
        raise UserError("--remote: no default DVC remote, where the experiments' data and run-cache go: "
                        "`dvc remote add -d NAME URL` (a folder, S3, SSH, ...)")
    url = _config_value(f'remote "{name}"', "url")
    if "://" not in url and not Path(url).is_absolute() and not re.match(r"^[\w.-]+@[\w.-]+:", url):
        # DVC resolves it against .dvc/ here but against another folder during `dvc exp push`
        raise UserError(f"DVC remote {name!r} has the relative path {url!r}: give an absolute one: "
                        f"`dvc remote modify {name} url {Path('.dvc', url).resolve()}`")


def _config_value(section: str, key: str) -> str:
    """As written in .dvc/config.local, else .dvc/config (`dvc config --list` shows paths made absolute)."""
    for path in CONFIGS:
        value = ConfigObj(str(path)).get(section, {}).get(key) if path.exists() else None
        if value:
            return value
    return ""


def pull(remote: str, all_commits: bool = False, outputs: bool = True) -> None:
    """Every experiment of the commit checked out (or of every commit) with its data and run-cache, for
    the study to resume from; or, without outputs, only its git refs: `dvc exp show` reads the metrics
    files that they name from the DVC remote (the report, which shows nothing else)."""
    out, err = dvc_output("exp", "pull", remote, *(["--all-commits"] if all_commits else ["--rev", "HEAD"]),
                          "--run-cache" if outputs else "--no-cache")
    _refuse_divergence(out + err, remote)


def push(remote: str, names: list[str]) -> None:
    """The named experiments with their data and every run-cache entry; one line if one is not on the remote."""
    if not names:
        return
    out, err = dvc_output("exp", "push", remote, *names, "--run-cache")
    _refuse_divergence(out + err, remote)
    landed = _names(r"Pushed experiment (.+?) to Git remote", out) + _names(r"Experiment (.+?) (?:is|are) up to date", out)
    missing = [name for name in names if name not in landed]
    if missing:
        last = ((out + err).strip().splitlines() or ["no output"])[-1]
        raise DvcFailed(f"error: `dvc exp push {remote}` did not push {', '.join(missing)}: {last}")


def _names(pattern: str, words: str) -> list[str]:
    """The experiments that DVC names in a line of `words`: push writes "a", "a and b" or "a, b and c",
    pull a Python list ("'['a', 'b']'"); rich wraps long lines at the terminal's width."""
    return [name for found in re.findall(pattern, " ".join(words.split())) for name in re.findall(r"[\w-]+", found) if name != "and"]


def _refuse_divergence(words: str, remote: str) -> None:
    diverged = _names(r"Local experiment (.+?) has diverged", words)
    if diverged:
        names = " ".join(diverged)
        raise UserError(f"experiment {names}: here and on {remote} under the same name, but not the same (the same "
                        f"cell run on two machines?): keep the remote's with `dvc exp remove {names}` and run again, "
                        f"or replace it with `dvc exp push --force {remote} {names}`")


def cell_name(cell: dict, expected_params: dict, baseline: str) -> str:
    """The same on every machine for the same cell and commit, and different for any other: model,
    strategy and seed to read, then a hash of every param and the baseline commit."""
    digest = hashlib.sha256(json.dumps([baseline, expected_params], sort_keys=True, default=str).encode())
    model = re.sub(r"[^A-Za-z0-9]+", "-", cell["model"].rsplit("/", 1)[-1]).strip("-")
    short = {"feature_extraction": "fe", "finetune": "ft", "lp_ft": "lp", "scratch": "sc"}[strategy_of(cell)]
    return f"{model}-{short}-s{cell['seed']}-{digest.hexdigest()[:8]}"


def baseline_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def shard_from_environment(environ=os.environ) -> tuple[int, int, str] | None:
    """(index from 1, count, where they came from) from a SLURM job array or a Kubernetes indexed Job."""
    if "SLURM_ARRAY_TASK_ID" in environ:
        first = _count(environ, "SLURM_ARRAY_TASK_MIN", "1")
        index, count = _count(environ, "SLURM_ARRAY_TASK_ID") - first + 1, _count(environ, "SLURM_ARRAY_TASK_COUNT")
        return index, count, f"SLURM_ARRAY_TASK_ID={environ['SLURM_ARRAY_TASK_ID']} of {count}"
    if "JOB_COMPLETION_INDEX" in environ:
        if "JOB_COMPLETIONS" not in environ:
            raise UserError("JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not: set it in the Job's env to "
                            "spec.completions (launch/kubernetes-job.yaml does), or pass --shard I/N")
        index, count = _count(environ, "JOB_COMPLETION_INDEX") + 1, _count(environ, "JOB_COMPLETIONS")
        return index, count, f"JOB_COMPLETION_INDEX={environ['JOB_COMPLETION_INDEX']} of {count}"
    return None


def _count(environ, name: str, default: str | None = None) -> int:
    value = environ.get(name, default)
    if value is None or not value.strip().isdigit():
        raise UserError(f"{name} is {value!r}, not a whole number: start the study from a SLURM job array "
                        "(sbatch --array=1-N) or an indexed Job, or pass --shard I/N")
    return int(value)
