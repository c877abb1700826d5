"""Several machines: three clones of one project stand in for them, a bare git repo and a folder
for the remotes."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from stages.study import remotes
from stages.pipeline.errors import UserError
from tests.conftest import TINY, processes_in, ran_stages, run

STUDY = [sys.executable, "-m", "stages.study", "--models", "alexnet", "--seeds", "0,1", *TINY]


def test_the_shard_comes_from_slurm_or_kubernetes_and_names_are_per_cell():
    assert remotes.shard_from_environment({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4",
                                           "SLURM_ARRAY_TASK_MIN": "1"})[:2] == (3, 4)
    assert remotes.shard_from_environment({"JOB_COMPLETION_INDEX": "0", "JOB_COMPLETIONS": "2"})[:2] == (1, 2)
    assert remotes.shard_from_environment({}) is None
    with pytest.raises(UserError, match="JOB_COMPLETIONS"):
        remotes.shard_from_environment({"JOB_COMPLETION_INDEX": "0"})
    with pytest.raises(UserError, match="^SLURM_ARRAY_TASK_ID is '3a', not a whole number: start") as error:
        remotes.shard_from_environment({"SLURM_ARRAY_TASK_ID": "3a", "SLURM_ARRAY_TASK_COUNT": "4"})
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="^SLURM_ARRAY_TASK_COUNT is None"):
        remotes.shard_from_environment({"SLURM_ARRAY_TASK_ID": "3"})
    cell = {"model": "timm/tf_efficientnet_lite0", "strategy": "finetune", "seed": 1}
    name = remotes.cell_name(cell, {"seed": 1, "lr": 0.1}, "abc")
    assert re.fullmatch(r"tf-efficientnet-lite0-ft-s1-[0-9a-f]{8}", name)
    assert name == remotes.cell_name(cell, {"lr": 0.1, "seed": 1}, "abc")
    assert name != remotes.cell_name(cell, {"seed": 1, "lr": 0.2}, "abc") != remotes.cell_name(cell, {"seed": 1}, "x")


def clone(origin, folder):
    run("git", "clone", "-q", str(origin), str(folder))
    run("git", "-C", str(folder), "config", "user.email", "test@example.com")
    run("git", "-C", str(folder), "config", "user.name", "test")
    return folder


def in_folder(folder, *command, check=True):
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} in {folder} failed:\n{result.stdout}\n{result.stderr}")
    return result


def remote_experiments(folder) -> dict:
    """{name: commit} of the experiments on the git remote origin."""
    listed = in_folder(folder, "git", "ls-remote", "origin", "refs/exps/*").stdout.split("\n")
    return {ref.rsplit("/", 1)[-1]: commit for commit, ref in (line.split() for line in listed if line)}


def accuracies(folder) -> dict:
    shown = json.loads(in_folder(folder, "dvc", "exp", "show", "--json").stdout)
    return {e["name"]: e["revs"][0]["data"]["metrics"]["metrics/metrics.json"]["data"]["test"]["accuracy"]
            for baseline in shown for e in baseline.get("experiments") or []}


def test_two_machines_share_a_study_through_git_and_dvc_remotes(dvc_project, tmp_path_factory):
    machines = tmp_path_factory.mktemp("machines")
    origin = machines / "origin.git"
    run("git", "init", "-q", "--bare", "-b", "main", str(origin))
    run("git", "branch", "-M", "main")
    run("dvc", "remote", "add", "-d", "store", "../store")  # relative: refused with its fix
    run("git", "commit", "-qam", "a DVC remote")
    run("git", "remote", "add", "origin", str(origin))
    run("git", "push", "-q", "origin", "main")
    relative = run(*STUDY, "--remote", "origin", check=False)
    assert relative.returncode == 2 and relative.stderr.count("\n") == 1 and "dvc remote modify store url" in relative.stderr
    run("dvc", "remote", "modify", "store", "url", str(machines / "store"))
    run("git", "commit", "-qam", "an absolute DVC remote")
    run("git", "push", "-q", "origin", "main")
    a, b, c = (clone(origin, machines / name) for name in "abc")

    shards = [subprocess.Popen([*STUDY, "--shard", f"{i}/2", "--remote", "origin"], cwd=folder, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for i, folder in ((1, a), (2, b))]
    assert shards[0].stdout.readline().startswith("shard 1/2 (--shard): 2 of 4 cells; 0 already done; queueing 2")
    pushed = next(line for line in shards[0].stdout if line.startswith("pushed "))  # a's first cell
    for pid in processes_in(a):  # machine a dies: the study, DVC's queue worker, the experiment's stages
        os.kill(pid, signal.SIGKILL)
    on_origin = remote_experiments(a)
    assert pushed.split()[1] in on_origin

    restarted = in_folder(a, *STUDY, "--shard", "1/2", "--remote", "origin")
    assert "2 of 4 cells; 1 already done; queueing 1" in restarted.stdout  # the pushed cell is not run again
    assert shards[1].wait(timeout=900) == 0
    after = remote_experiments(a)
    assert len(after) == 4 and all(after[name] == commit for name, commit in on_origin.items())  # none lost
    ran_here = {**accuracies(a), **accuracies(b)}
    assert len(ran_here) == 4

    report = in_folder(c, sys.executable, "-m", "stages.study.report", "--remote", "origin")
    assert not [p for p in (c / ".dvc/cache").rglob("*") if p.is_file()]  # git refs only: no model, array or run-cache
    assert accuracies(c) == ran_here  # every cell once, as the machines that ran them measured it
    assert report.stdout.count("| alexnet |") == 2 and "0,1" in report.stdout
    fe_seed_0 = next(name for name in ran_here if name.startswith("alexnet-fe-s0-"))
    in_folder(c, "dvc", "exp", "pull", "origin", "--run-cache")  # the outputs and run-cache, as the study pulls them
    in_folder(c, "dvc", "exp", "apply", fe_seed_0)
    assert (c / "models/train_heads/model.pt").stat().st_size > 10_000

    again = in_folder(a, *STUDY, "--remote", "origin")  # the whole grid now: b's cells were pulled
    assert "4 of 4 cells; 4 already done; queueing 0" in again.stdout

    restored = in_folder(c, "dvc", "exp", "run", *TINY, "-S", "model=alexnet", "-S", "strategy=finetune",
                         "-S", "seed=1")
    assert ran_stages(restored.stdout) == ["check-inputs"]  # prepare-data, finetune and evaluate from the remote

    # the same cell run where its result was not pulled: its name collides on the remote
    d = clone(origin, machines / "d")
    in_folder(d, *STUDY[:6], "0", *TINY, "--strategies", "feature_extraction")
    collision = in_folder(d, *STUDY[:6], "0", *TINY, "--strategies", "feature_extraction", "--remote", "origin",
                          check=False)
    assert collision.returncode == 2 and collision.stderr.count("\n") == 1, collision.stderr
    assert "not the same" in collision.stderr and "dvc exp remove alexnet-fe-s0-" in collision.stderr
