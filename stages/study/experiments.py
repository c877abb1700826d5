"""What DVC knows of the study's experiments: its commands, and `dvc exp show --json` as records.

A record is one experiment: its name, state (queued, running, failed or success), params.yaml
(nested) and metrics files ({path: content}) as DVC committed them, and for a failure the last
error line of the log that DVC names. The study (grid.py) waits on the states; the report
(report.py) tables the params and metrics.
"""
import fcntl
import json
import sys
import subprocess
import tempfile
import time
from pathlib import Path

from stages.pipeline import outputs
from stages.pipeline.errors import UserError

# A state is worth waiting for, done, or neither; success first when several runs share params.
PREFERENCE = ("success", "running", "queued", "failed")
EXP_SHOW_TIMEOUT_S = 60  # it takes seconds, a few tens under load
EXP_SHOW_TRIES = 3  # hangs in a row before giving up
EXP_SHOW_FAILING_S = 60  # a failing read (a queue worker removing its folder meanwhile) is asked again this long
QUEUE_MESSAGES = Path(".dvc/tmp/exps/celery/broker")  # the DVC queue's celery messages, a file each
NOT_RUN = "not run: "  # starts the error of a run that never started: queued, running, lost before its start


class DvcFailed(SystemExit):
    """A DVC command exited non-zero: its message is one line naming the command and DVC's last words."""


def dvc(*args: str, env: dict | None = None, timeout: float | None = None) -> str:
    """A DVC command's stdout; if it fails, one line that names the command and DVC's last words.
    Past the timeout, the command is killed and subprocess.TimeoutExpired raised."""
    return dvc_output(*args, env=env, timeout=timeout)[0]


def dvc_output(*args: str, env: dict | None = None, timeout: float | None = None) -> tuple[str, str]:
    """dvc()'s stdout and stderr, for the commands whose warnings matter (exp push and pull)."""
    # Files, not pipes: the workers that `dvc queue start` leaves running inherit them, and reading
    # a pipe to its end would wait for those workers to exit
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            code = subprocess.run(["dvc", *args], stdout=out, stderr=err, env=env, timeout=timeout).returncode
        except FileNotFoundError:
            raise UserError("dvc is not on PATH: run through ./venv.sh, or activate .venv first") from None
        out.seek(0)
        err.seek(0)
        if code != 0:
            said = err.read()
            raise DvcFailed(f"error: `dvc {' '.join(args)}` failed with exit code {code}: {last_error(said)}")
        return out.read(), err.read()


def last_error(stderr: str) -> str:
    """DVC's last ERROR line (its closing lines invite to a chat), else its last line."""
    lines = stderr.strip().splitlines() or ["no output"]
    return ([line.strip() for line in lines if line.startswith("ERROR")] or lines)[-1]


def exp_show(all_commits: bool = False) -> list[dict]:
    """`dvc exp show --json`, asked again when it hangs (reading an experiment that finishes
    meanwhile can block it for good: pygit2's blob reader waits on a thread that has died) or
    fails (observed: "failed to show experiments - directory '.dvc/tmp/exps/...'" while a queue
    worker cleaned up; a queue message half written by a killed process fails every read, so it
    is removed), after 1, 2, 4, ... s, until it has failed for EXP_SHOW_FAILING_S."""
    hangs, failing_s, wait = 0, 0.0, 1.0
    while True:
        try:
            return json.loads(dvc("exp", "show", "--json", *(["--all-commits"] if all_commits else []),
                                  timeout=EXP_SHOW_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            hangs += 1
            if hangs == EXP_SHOW_TRIES:
                raise SystemExit(f"error: `dvc exp show --json` did not finish in {EXP_SHOW_TIMEOUT_S} s, "
                                 f"{EXP_SHOW_TRIES} times over") from None
        except DvcFailed as failure:
            if remove_half_written_messages():
                continue
            if failing_s >= EXP_SHOW_FAILING_S:
                raise SystemExit(f"{failure} (still, after {failing_s:.0f} s of asking again)") from None
            time.sleep(wait)
            failing_s, wait = failing_s + wait, min(2 * wait, 15.0)


def remove_half_written_messages(folder: Path = QUEUE_MESSAGES) -> int:
    """Removes the queue's message files that are not JSON, and says how many. Celery writes each
    under an exclusive lock, and DVC reads all of them (replies included) on every `exp show`, so
    one that a SIGKILL cut short fails every read for good ("unexpected error - Unterminated
    string"). Under a shared lock, a file still being written is waited for, never removed."""
    removed = []
    for path in [*folder.glob("in/*.msg"), *folder.glob("processed/*.msg")]:
        try:
            with open(path, "rb") as file:
                fcntl.flock(file, fcntl.LOCK_SH)
                text = file.read()
            if text:  # DVC skips an empty one
                json.loads(text)
        except FileNotFoundError:  # consumed meanwhile
            continue
        except ValueError:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        print(f"warning: removed {len(removed)} DVC queue message(s) that a killed process left half written "
              f"({removed[0]})", file=sys.stderr, flush=True)
    return len(removed)


def workspace_params(shown: list[dict]) -> dict:
    """params.yaml in the workspace, which DVC stashes as the start of every queued experiment."""
    workspace = next(rev for rev in shown if rev["rev"] == "workspace")
    return _file_data((workspace.get("data") or {}).get("params"), "params.yaml")


def records(shown: list[dict]) -> list[dict]:
    """One record per experiment: name, state, params (nested), metrics ({path: content}), error, log, pid."""
    return [_record(experiment) for baseline in shown for experiment in baseline.get("experiments") or []]


def _record(experiment: dict) -> dict:
    head = experiment["revs"][0]  # the experiment's last commit
    data = head.get("data") or {}
    executor = executor_of(experiment)
    log = (executor.get("local") or {}).get("log")
    return {"name": experiment.get("name") or head.get("name") or head["rev"][:7], "state": executor["state"],
            "params": _file_data(data.get("params"), "params.yaml"), "metrics": _metrics_files(data.get("metrics")),
            "error": _error(executor["state"], log, None if experiment.get("executor") else head.get("error"),
                            (data.get("metrics") or {}).get(str(outputs.METRICS))),
            "log": log, "pid": (executor.get("local") or {}).get("pid")}


def executor_of(experiment: dict) -> dict:
    """The experiment's state, and its process under "local". DVC 3 keeps them in the queue's
    executor; an experiment run outside the queue, or one whose queue entry `dvc queue remove
    --success` cleared, has none: only successes have commits."""
    return experiment.get("executor") or {"state": "failed" if experiment["revs"][0].get("error") else "success"}


def _file_data(files: dict | None, path: str) -> dict:
    return ((files or {}).get(path) or {}).get("data") or {}


def _metrics_files(files: dict | None) -> dict:
    """{path: content} of the metrics files that DVC could read."""
    return {path: found["data"] for path, found in (files or {}).items() if (found or {}).get("data")}


def _error(state: str, log: str | None, unreadable: dict | None, metrics: dict | None) -> str | None:
    """Why an experiment has no result; `unreadable`: DVC's error for a commit it could not read;
    `metrics`: what `dvc exp show` gave for its metrics/metrics.json."""
    if state == "success":
        read_error = (metrics or {}).get("error")
        # A pulled experiment's metrics files come from the DVC remote (report.py pulls git refs only)
        return read_error and (f"{outputs.METRICS} unreadable: {read_error.get('msg')} (it is read from the default DVC "
                               "remote: is that reachable, with its credentials?)")
    if state in ("queued", "running"):
        return f"{NOT_RUN}still {state}"
    if log and Path(log).is_file():
        return failure_line(Path(log))
    if unreadable:
        return unreadable.get("msg") or "failed"
    return f"{NOT_RUN}failed before it started, with no log (see .dvc/tmp/exps/celery/*.out)"


def failure_line(log: Path) -> str:
    """The last error line that the failed experiment printed: a stage's own, else DVC's."""
    lines = log.read_text(errors="replace").splitlines()
    ours = [line.strip() for line in lines if line.lstrip().startswith("error: ")]
    dvcs = [line.strip() for line in lines if line.lstrip().startswith("ERROR: ")]
    return (ours or dvcs or [f"failed (log: {log})"])[-1]


def flat(nested: dict, prefix: str = "") -> dict:
    """{"data": {"image_size": 64}} -> {"data.image_size": 64}"""
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def nest(dotted: dict, into: dict | None = None) -> dict:
    """{"data.image_size": 64} -> {"data": {"image_size": 64}}, or written into the nested dict `into`."""
    out = {} if into is None else into
    for key, value in dotted.items():
        *parents, last = key.split(".")
        section = out
        for name in parents:
            section = section.setdefault(name, {})
        section[last] = value
    return out


def most_advanced(same_params: list[dict]) -> dict:
    """Of records with the same params: a success, else one still to come, else the latest failure."""
    return min(same_params, key=lambda r: state_order(r["state"]))


def state_order(state: str | None) -> int:
    """A state's place in PREFERENCE; an unknown one (or None) last."""
    return PREFERENCE.index(state) if state in PREFERENCE else len(PREFERENCE)
