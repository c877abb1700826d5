"""DVC's queue, as the study drives it: cells queued under their names, one worker per GPU started as
the ones before it run, the experiments waited for with a progress bar, Ctrl-C stopping what the study
started, and experiments left "running" by a machine that died marked failed to be run again. Every
state comes from `dvc exp show --json` (experiments.py)."""
import os
import signal
import sys
import time

from tqdm import tqdm

from stages.study import experiments, protocols
from stages.study.experiments import dvc

POLL_SECONDS = 5
STALL_POLLS = 24  # two minutes with no experiment alive and no state changing: the queue has stopped
STOP_TRIES = 5  # reads of the states on Ctrl-C, each followed by removing and killing what it shows


def enqueue(todo: list[dict], names: dict[int, str], records: list[dict]) -> None:
    """One `dvc exp run --queue` per cell, under its name; a failed run of it leaves the queue first."""
    failed = {r["name"] for r in records if r["state"] == "failed"}
    for cell in todo:
        name = names[id(cell)]
        if name in failed:
            dvc("queue", "remove", name)
        dvc("exp", "run", "--queue", "--name", name, *protocols.set_flags(cell))


def fail_dead_runs(records: list[dict]) -> list[dict]:
    """Experiments left "running" by a machine that died: DVC keeps them so for good, and so they are
    marked failed (`dvc queue kill`), to be run again."""
    stale = [r for r in records if r["state"] == "running" and r["pid"] is not None and not alive(r["pid"])]
    if stale:
        dvc("queue", "kill", *(r["name"] for r in stale))
    return [{**r, "state": "failed"} if r in stale else r for r in records]


def run_queue(names: list[str], gpus: list[str], on_success=lambda names: None) -> None:
    """Starts one queue worker per GPU and waits for the experiments, with a progress bar.

    `dvc queue start -j k` starts the workers numbered 1..k that are not alive, each a daemon that
    inherits our environment and runs one experiment at a time. So worker k+1 starts, with its own
    CUDA_VISIBLE_DEVICES, only once k experiments run: then workers 1..k are alive and only it is new.
    A worker stops after 10 s with nothing queued; until then one left by an earlier study keeps
    that study's GPU, and this one counts it among its own. Each experiment that succeeds is passed,
    once, to on_success.
    """
    workers, quiet, last, succeeded = 0, 0, None, set()
    with tqdm(total=len(names), desc="experiments", unit="exp") as bar:
        while True:
            states, pids = experiment_states(names)
            finished = sum(state in ("success", "failed", None) for state in states.values())
            bar.update(finished - bar.n)
            newly = [name for name, state in states.items() if state == "success" and name not in succeeded]
            if newly:
                on_success(newly)
                succeeded.update(newly)
            if finished == len(names):
                return
            running = sum(state == "running" for state in states.values())
            queued = sum(state == "queued" for state in states.values())
            if queued and workers < max(1, len(gpus)) and running >= workers:
                start_worker(gpus[workers] if gpus else None, workers + 1)
                workers += 1
            # Progress: a state changed, or some experiment in the repository (ours or another's ahead
            # of ours) still has a live process
            snapshot = sorted(states.values(), key=str)
            quiet = 0 if snapshot != last or any(map(alive, pids)) else quiet + 1
            if quiet >= STALL_POLLS:
                raise SystemExit(f"error: the DVC queue stopped: {len(names) - finished} experiment(s) unfinished "
                                 f"and none running for {STALL_POLLS * POLL_SECONDS} s (did its workers die? see "
                                 "`dvc queue status`); python -m stages.study.report shows what finished")
            last = snapshot
            time.sleep(POLL_SECONDS)


def experiment_states(names: list[str]) -> tuple[dict, list]:
    """From `dvc exp show --json`: {name: state} of ours (None: gone), and the pid of every running
    experiment's process (None while it sets up)."""
    shown, pids = {}, []
    for experiment in (e for baseline in experiments.exp_show() for e in baseline.get("experiments") or []):
        executor = experiments.executor_of(experiment)
        shown[experiment.get("name")] = executor["state"]
        if executor["state"] == "running":
            pids.append((executor.get("local") or {}).get("pid"))
    return {name: shown.get(name) for name in names}, pids


def start_worker(gpu: str | None, number: int) -> None:
    env = None if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
    dvc("queue", "start", "--jobs", str(number), env=env)


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def stop(names: list[str]) -> None:
    """Ctrl-C: this study's running experiments killed, its queued ones removed, the queue's workers
    stopped, so that nothing it started goes on; then exit 130. Finished experiments stay, and the
    killed ones count as failed, so the same command run again resumes with what is left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the queue half-stopped
    print("interrupted: stopping this study's experiments and the queue's workers ...", file=sys.stderr, flush=True)
    removed, killed = set(), set()
    for attempt in range(STOP_TRIES):
        states, _ = experiment_states(names)
        queued = [name for name, state in states.items() if state == "queued"]
        running = [name for name, state in states.items() if state == "running"]
        if not queued and not running:
            break
        try:
            if queued:
                dvc("queue", "remove", *queued)
                removed.update(queued)
            for name in running:  # one at a time: DVC kills the names it finds, then refuses the rest
                dvc("queue", "kill", "--force", name)
                killed.add(name)
        except experiments.DvcFailed:
            # Between the read and the command an experiment started or finished, and DVC refuses a
            # name no longer in the state asked for: read the states again
            if attempt == STOP_TRIES - 1:
                raise
    dvc("queue", "stop")
    print(f"stopped: {len(killed)} running experiment(s) killed and {len(removed)} queued one(s) removed; "
          "run the same command again to resume (finished cells are not run again)", file=sys.stderr)
    sys.exit(130)
