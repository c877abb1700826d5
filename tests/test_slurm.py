"""launch/slurm.sh on a real one-node SLURM cluster, started here: munged, slurmctld and slurmd from
Debian's slurm-wlm and munge packages (.ci/run installs them), with a minimal slurm.conf of this
machine's CPUs and memory and no cgroups. It runs where those are installed and we are root (the
daemons need it), else skips with the reason; it runs DVC, so the fast tier leaves it out."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, run

COMMANDS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")
pytestmark = [pytest.mark.dvc, pytest.mark.skipif(
    os.geteuid() != 0 or not all(map(shutil.which, COMMANDS)),
    reason="needs root and Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge; .ci/run does)")]
# Ports of our own, so that a SLURM already running on this machine is left alone
CONF = """ClusterName=ci
SlurmctldHost={host}
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
{node} State=UNKNOWN
PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
STUDY = ["--protocol", "notebook", "--models", "alexnet", "--strategies", "feature_extraction", "--seeds", "0,1", *TINY]  # two cells; --protocol wins over the script's best


def munge_works() -> bool:
    credential = subprocess.run(["munge", "-n"], capture_output=True)
    return credential.returncode == 0 and subprocess.run(["unmunge"], input=credential.stdout,
                                                         capture_output=True).returncode == 0


def wait_until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        time.sleep(0.5)


@pytest.fixture
def slurm(tmp_path_factory, monkeypatch):
    """A one-node cluster of this machine; SLURM_CONF points the commands at it. Stops what it started."""
    folder = tmp_path_factory.mktemp("slurm")
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    host = node.split()[0].removeprefix("NodeName=")
    for place in ("state", "spool"):
        (folder / place).mkdir()
    (folder / "slurm.conf").write_text(CONF.format(host=host, folder=folder, node=node))
    monkeypatch.setenv("SLURM_CONF", str(folder / "slurm.conf"))
    started = []
    try:
        if not munge_works():  # one already running (a real cluster's) serves ours too
            Path("/run/munge").mkdir(mode=0o755, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
            started.append(subprocess.Popen(["munged", "--foreground"], user="munge", group="munge",
                                            stderr=subprocess.DEVNULL))
            wait_until(munge_works, 20, "munged")
        for daemon in ("slurmctld", "slurmd"):
            started.append(subprocess.Popen([daemon, "-D"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
                   == ["idle"], 60, "the node idle in sinfo")
        yield folder
    finally:
        # Whatever a failed or timed-out test left queued or running: every job on this private cluster is ours
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs])
            wait_until(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(),
                       60, "the cancelled jobs gone")
        for process in reversed(started):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_slurm_array_runs_the_study_one_shard_a_task_and_the_report_sees_every_cell(dvc_project, slurm,
                                                                                        tmp_path_factory):
    shared = tmp_path_factory.mktemp("cluster")
    origin, store, scratch = shared / "origin.git", shared / "store", shared / "tmp"
    scratch.mkdir()
    run("git", "init", "-q", "--bare", "-b", "main", str(origin))
    run("git", "branch", "-M", "main")
    run("dvc", "remote", "add", "-d", "store", str(store))
    run("git", "commit", "-qam", "a DVC remote")
    run("git", "push", "-q", str(origin), "main")
    env = {**os.environ, "REPO": str(origin), "VENV": str(Path(sys.executable).parent.parent), "TMPDIR": str(scratch),
           "HOME": str(shared)}  # a node with no git identity: the script sets one
    started = time.monotonic()
    submitted = subprocess.run(["sbatch", "--wait", "--parsable", "--array=1-2", "--gpus=0", "--cpus-per-task=1",
                                "--mem=2G", str(REPO / "launch/slurm.sh"), *STUDY], env=env, capture_output=True,
                               text=True, timeout=900)
    job = submitted.stdout.strip().split(";")[0]
    logs = {task: dvc_project / f"transfer-study-{job}_{task}.log" for task in (1, 2)}
    told = "\n".join(f"--- task {task}:\n{log.read_text() if log.exists() else '(no log)'}" for task, log in logs.items())
    if submitted.returncode != 0:
        raise AssertionError(f"sbatch --wait exited {submitted.returncode}: {submitted.stderr}\n{told}\n"
                             f"{(slurm / 'slurmctld.log').read_text()[-3000:]}")
    print(f"the array ran in {time.monotonic() - started:.0f} s")
    for task, log in logs.items():
        assert f"shard {task}/2 (SLURM_ARRAY_TASK_ID={task} of 2): 1 of 2 cells" in log.read_text(), told
        assert "pushed alexnet-fe-s" in log.read_text(), told
    assert not list(scratch.iterdir())  # each task removed its work folder

    fresh = shared / "fresh"
    run("git", "clone", "-q", str(origin), str(fresh))
    report = subprocess.run([sys.executable, "-m", "stages.study.report", "--remote", "origin"], cwd=fresh,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table = (fresh / "study/results.md").read_text()
    assert "| alexnet | feature extraction |" in table and "| 0,1 " in table and "| failed" not in table, table
