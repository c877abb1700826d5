"""Two `dvc exp run` at once (DVC 3.67.1): in one workspace DVC breaks both; with --temp both finish.

What DVC does when a second `dvc exp run` starts while a first one runs a stage in the workspace:
the first releases the repo lock for the whole run (repo/experiments/__init__.py `_reproduce_queue`
is @unlocked_repo) and its inner repro releases it while each stage's command runs (stage/run.py `run_stage`),
so the second takes the lock, stashes the workspace, writes its -S into params.yaml, applies its own
stash there for good (executor/local.py `init_git`), force-checks-out the outputs of the workspace's
dvc.lock over the running stage's folder (executor/base.py `reproduce`), and only then, at its first stage,
meets the first's stage rwlock ("... is busy", rwlock.py `_check_blockers`). Its cleanup deletes the first's
EXEC_BASELINE ref (executor/local.py `cleanup`), so the first, which finishes its stages, fails to commit:
ExpRefInfo(None, name) -> refs.py `ExpRefInfo.parts`: `baseline_sha[:2]`, "'NoneType' object is not subscriptable".
Nothing in our stages runs before the second's damage; the rule is in the README.
"""
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import yaml

from tests.conftest import FAST, REPO, run, set_params

# FAST on fewer images, so that a whole pipeline takes seconds; the head still trains for several.
SMALL = {**FAST, "data.synthetic.train_per_class": 20, "data.synthetic.test_per_class": 10, "train_heads.epochs": 2}
WORKSPACE_PID_FILE = ".dvc/tmp/exps/run/workspace/workspace.json"  # DVC's record of the running workspace exp


def start(log, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["dvc", "exp", "run", *args], stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(log, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, f"exited ({process.returncode}) before {text!r}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{log.read_text()}"
        time.sleep(0.1)


def seed_in(path) -> int:
    return yaml.safe_load(path.read_text())["seed"]


def experiments() -> dict:
    """{experiment ref: its params.yaml's seed}, DVC's running-experiment refs (refs/exps/exec/) left out."""
    refs = run("git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    return {ref: yaml.safe_load(run("git", "show", f"{ref}:params.yaml").stdout)["seed"]
            for ref in refs if not ref.startswith("refs/exps/exec/")}


def cached_model_intact(ref: str) -> bool:
    """Whether the cache's copy of the head that experiment `ref` trained still has the hash dvc.lock gives it."""
    lock = yaml.safe_load(run("git", "show", f"{ref}:dvc.lock").stdout)
    (folder,) = [o["md5"] for o in lock["stages"]["train-heads"]["outs"] if o["path"] == "models/train_heads"]
    cache = Path(".dvc/cache/files/md5")
    listing = json.loads((cache / folder[:2] / folder[2:]).read_text())
    (model,) = [f["md5"] for f in listing if f["relpath"] == "model.pt"]
    return hashlib.md5((cache / model[:2] / model[2:]).read_bytes()).hexdigest() == model


def writes_read_only_files(tmp_path_factory) -> bool:
    """Whether this user can open a file of mode 0444 for writing (root can), as the stages' writes do."""
    probe = tmp_path_factory.mktemp("probe") / "read-only"
    probe.write_text("")
    probe.chmod(0o444)
    try:
        probe.open("w").close()
        return True
    except PermissionError:
        return False


def test_canary_dvc_bug_a_second_workspace_run_breaks_the_first(dvc_project, tmp_path_factory):
    """A canary for DVC upgrades: it pins a bug of DVC 3.67.1 (the module's docstring), and the README's
    rule and venv.sh's refusal exist for it. When it fails after an upgrade, DVC may have fixed the bug:
    read the new behaviour, then drop the rule, venv.sh's refusal and this test, or adapt them."""
    logs = tmp_path_factory.mktemp("logs")
    set_params(dvc_project / "params.yaml", SMALL)
    run("git", "commit", "-qam", "small params")
    run("dvc", "exp", "run", "train-heads")  # a finished experiment: its outputs and dvc.lock are in the workspace
    (baseline,) = experiments()
    assert cached_model_intact(baseline)

    first = start(logs / "first", "train-heads", "-S", "seed=1", "-S", "train_heads.epochs=8")
    wait_for(logs / "first", "epochs:", first)  # train-heads has read params.yaml and is training
    assert seed_in(dvc_project / "params.yaml") == 1
    assert json.loads((dvc_project / WORKSPACE_PID_FILE).read_text())["pid"] == first.pid
    second = run("dvc", "exp", "run", "train-heads", "-S", "seed=2", check=False)
    first.wait(timeout=180)
    first_out, second_out = (logs / "first").read_text(errors="replace"), second.stdout + second.stderr

    assert second.returncode != 0 and "is busy, it is being blocked by" in second_out, second_out
    assert f"(PID {first.pid})" in second_out and ".dvc/tmp/rwlock" in second_out
    assert first.returncode != 0, first_out
    assert list(experiments().values()) == [0]  # neither run left an experiment
    assert seed_in(dvc_project / "params.yaml") == 2  # the second, which ran nothing, left its -S in the workspace
    assert not (dvc_project / WORKSPACE_PID_FILE).exists()
    # The second's checkout put the baseline's model.pt into the running stage's folder, as a copy
    # (cache.type reflink,copy): the first's save replaced the copy, never the cached object
    assert cached_model_intact(baseline)
    assert "'NoneType' object is not subscriptable" in first_out  # it trained and saved, then lost its result
    assert "last epoch 8" in first_out
    # and the first's dvc.lock, written after the second's change, says its head was trained with seed 2
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    assert lock["stages"]["train-heads"]["params"]["params.yaml"]["seed"] == 2


def test_an_output_edited_in_place_leaves_every_cache_object_whole_and_repro_makes_it_again(dvc_project):
    set_params(dvc_project / "params.yaml", SMALL)
    run("git", "commit", "-qam", "small params")
    run("dvc", "exp", "run", "prepare-data")
    images = dvc_project / "data/prepared/train_images.npy"
    made = md5_of(images)
    edited = np.load(images)
    edited.flat[:500] = 7
    np.save(images, edited)  # in place, as a user would: with hardlinks (and root) into the cached object
    assert md5_of(images) != made and corrupt_cache_objects() == []
    run("dvc", "repro", "prepare-data")
    assert md5_of(images) == made and corrupt_cache_objects() == []


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def corrupt_cache_objects() -> list[Path]:
    """The objects in DVC's cache whose content no longer has the hash that names them."""
    objects = [p for p in Path(".dvc/cache/files/md5").glob("*/*") if p.is_file()]
    assert objects
    return [p for p in objects if p.parent.name + p.name.removesuffix(".dir") != md5_of(p)]


def test_two_temp_runs_side_by_side_both_finish_and_leave_the_workspace_alone(dvc_project, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    set_params(dvc_project / "params.yaml", SMALL)
    run("git", "commit", "-qam", "small params")
    first = start(logs / "first", "--temp", "train-heads", "-S", "seed=1")
    wait_for(logs / "first", "Running stage 'prepare-data'", first)
    second = start(logs / "second", "--temp", "train-heads", "-S", "seed=2")
    for process, log in ((first, logs / "first"), (second, logs / "second")):
        assert process.wait(timeout=240) == 0, log.read_text()
        assert "Ran experiment(s)" in log.read_text()
    assert sorted(experiments().values()) == [1, 2]
    assert run("git", "status", "--porcelain").stdout == "" and seed_in(dvc_project / "params.yaml") == 0
    assert not (dvc_project / "dvc.lock").exists()


def test_venv_sh_refuses_a_second_workspace_run_before_it_changes_anything(dvc_project):
    for name in ("venv.sh", "requirements.txt"):
        shutil.copy(REPO / name, dvc_project / name)
    (dvc_project / ".venv").symlink_to(REPO / ".venv")
    running = dvc_project / WORKSPACE_PID_FILE
    running.parent.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])  # stands in for the first run's process
    try:
        running.write_text(json.dumps({"pid": sleeper.pid}))
        before = (dvc_project / "params.yaml").read_text()
        refused = run("./venv.sh", "dvc", "exp", "run", "-S", "seed=3", check=False)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert f"another dvc exp run (PID {sleeper.pid}) is running" in refused.stderr and "--temp" in refused.stderr
        assert (dvc_project / "params.yaml").read_text() == before
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run("./venv.sh", "dvc", "exp", "run", "--help").returncode == 0  # the first is gone: allowed
