"""The whole model × strategy × seed grid as queued DVC experiments, one per GPU at a time, then the report.

    python -m stages.study                                    # alexnet,vgg16 × both strategies, seed 0
    python -m stages.study --seeds 0,1,2 --protocol readme    # the README's protocol, mean ± std over 3 seeds
    python -m stages.study --gpus 0,1,2,3                     # up to four experiments at once, one per GPU
    python -m stages.study --gpus 0+1,2+3 -S finetune.processes=2   # two GPUs for each fine-tune
    python -m stages.study --shard 1/2                        # this machine's half of the grid; another runs 2/2
    python -m stages.study --models timm/tf_efficientnet_lite0 -S data.source=imagefolder \\
        -S data.root=/path/to/images -S weights=/path/to/lite0.pth -S data.image_size=96

Each cell is one experiment queued with `dvc exp run --queue`: the protocol's overrides
(stages/protocols.yaml, default notebook), then the -S flags, which win, then the cell's model,
strategy and seed. DVC runs each in its own temporary copy of the repository, sharing the cache
and run-cache. One queue worker per GPU (`dvc queue start`, started with CUDA_VISIBLE_DEVICES
set to its GPU, or to its group of GPUs for a fine-tune under torchrun) runs its experiments one
after another, so no two share a GPU and the GPU never becomes a param; with no GPU, one worker.
A cell whose params (the workspace's params.yaml with the cell's overrides) already have a
successful experiment is not run again; one still queued or running is waited for. Every state
comes from `dvc exp show --json`. The report (stages/report.py) then writes study/; the command
exits non-zero if an experiment failed. Paths given with -S are made absolute, since queued
experiments run in another folder.
"""
import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from tqdm import tqdm

from stages import protocols, report
from stages.errors import UserError, run_stage
from stages.report import dvc, flat

STRATEGIES = ("feature_extraction", "finetune")
GRID_KEYS = ("model", "strategy", "seed")  # set by --models, --strategies and --seeds
PATH_KEYS = ("data.root", "weights")
POLL_SECONDS = 5
STALL_POLLS = 24  # two minutes with no experiment alive and no state changing: the queue has stopped


def parse_args(argv=None) -> argparse.Namespace:
    parser = report.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="alexnet,vgg16", help="comma-separated")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument("--seeds", default="0", help="comma-separated integers >= 0")
    parser.add_argument("--protocol", default=protocols.PUBLISHED_PROTOCOL, choices=list(protocols.PROTOCOLS),
                        help="the override set of stages/protocols.yaml applied to every cell; -S wins over it")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="passed to every experiment, as dvc exp run -S reads it; repeatable")
    parser.add_argument("--gpus", help="comma-separated GPU ids, one experiment on each at a time, or groups "
                                       "such as 0+1,2+3 for a fine-tune with finetune.processes: 2; default: "
                                       "every visible GPU (grouped so), or one experiment at a time with none")
    parser.add_argument("--shard", default="1/1", metavar="I/N",
                        help="run the I-th of N equal shares of the grid (each machine one share)")
    args = parser.parse_args(argv)
    args.models = comma_list("--models", args.models)
    args.strategies = comma_list("--strategies", args.strategies)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise UserError(f"--strategies: unknown {', '.join(unknown)} (known: {', '.join(STRATEGIES)})")
    seeds = comma_list("--seeds", args.seeds)
    if not all(s.isdigit() for s in seeds):
        raise UserError(f"--seeds {args.seeds}: must be integers >= 0, comma-separated, e.g. 0,1,2")
    args.seeds = [int(s) for s in seeds]
    args.gpus = None if args.gpus is None else comma_list("--gpus", args.gpus)
    args.shard = parse_shard(args.shard)
    args.overrides = {**protocols.overrides(args.protocol), **parse_overrides(args.overrides)}
    return args


def comma_list(option: str, text: str) -> list[str]:
    """A comma-separated list with no empty or repeated item."""
    items = [item.strip() for item in text.split(",")]
    if not all(items) or len(set(items)) != len(items):
        raise UserError(f"{option} {text!r}: must be a comma-separated list with no empty or repeated item")
    return items


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UserError(f"--shard {text}: must be I/N with 1 <= I <= N, e.g. 1/2")
    return int(match[1]), int(match[2])


def parse_overrides(pairs: list[str]) -> dict:
    """{dotted key: value}, each value read as DVC reads -S: Hydra's grammar, so 1e-3 is a float."""
    parser = OverridesParser.create()
    overrides = {}
    for pair in pairs:
        try:
            override = parser.parse_override(pair)
        except HydraException as error:
            raise UserError(f"-S {pair}: not key=value ({str(error).splitlines()[0]})") from None
        key = override.key_or_group
        if "=" not in pair or override.type != OverrideType.CHANGE or override.package is not None:
            raise UserError(f"-S {pair}: must be key=value, e.g. -S data.image_size=96")
        if override.is_sweep_override():
            raise UserError(f"-S {pair}: one value per key (a sweep is --models, --strategies or --seeds); "
                            f"quote a value with a comma: -S \"{key}='a,b'\"")
        if key in GRID_KEYS:
            raise UserError(f"-S {pair}: {key} is set by --{key}s")
        value = override.value()
        if isinstance(value, (list, dict)):
            raise UserError(f"-S {pair}: a string, number, boolean or null, not a list or mapping")
        if key in PATH_KEYS and isinstance(value, str) and Path(value).exists():
            value = str(Path(value).resolve())
        overrides[key] = value
    return overrides


def grid(models: list[str], strategies: list[str], seeds: list[int], overrides: dict) -> list[dict]:
    return [{**overrides, "model": m, "strategy": s, "seed": seed} for m in models for s in strategies for seed in seeds]


def shard(cells: list[dict], index: int, count: int) -> list[dict]:
    """The index-th (from 1) of count shares: every count-th cell, so that shares differ by one at most."""
    return cells[index - 1::count]


def gpu_groups(gpus: list[str] | None, processes: int) -> list[str]:
    """One CUDA_VISIBLE_DEVICES per worker: a GPU, or as many GPUs as a fine-tune has processes."""
    if gpus is None:
        ids = visible_gpus()
        return [",".join(ids[i:i + processes]) for i in range(0, len(ids) - processes + 1, processes)]
    groups = [group.split("+") for group in gpus]
    ids = [i for group in groups for i in group]
    if not all(ids) or len(set(ids)) != len(ids):
        raise UserError(f"--gpus {','.join(gpus)}: a GPU in two places, or an empty one")
    short = [group for group in groups if len(group) < processes]
    if short:
        raise UserError(f"--gpus {'+'.join(short[0])}: finetune.processes is {processes}, so a fine-tune needs "
                        f"{processes} GPUs: join them with +, e.g. --gpus {'+'.join(map(str, range(processes)))}")
    return [",".join(group) for group in groups]


def visible_gpus() -> list[str]:
    """The ids of the GPUs this process sees, as CUDA_VISIBLE_DEVICES names them (so a worker sees the same one)."""
    import torch  # here: only when --gpus is not given

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in visible.split(",")] if visible else [str(i) for i in range(count)]
    return ids[:count]


def plan(cells: list[dict], workspace: dict, records: list[dict]) -> tuple[list, list, list]:
    """(done, pending, todo) cells: a success, an experiment still queued or running, neither."""
    done, pending, todo = [], [], []
    for cell in cells:
        state = report.best(matching(cell, workspace, records) or [{"state": None}])["state"]
        {"success": done, "queued": pending, "running": pending}.get(state, todo).append(cell)
    return done, pending, todo


def matching(cell: dict, workspace: dict, records: list[dict]) -> list[dict]:
    """The experiments whose every param is the cell's: the workspace's params.yaml with its overrides."""
    wanted = expected(cell, workspace)
    return [r for r in records if flat(r["params"]) == wanted]


def expected(cell: dict, workspace: dict) -> dict:
    return {**flat(workspace), **{k: tuple(v) if isinstance(v, list) else v for k, v in cell.items()}}


def queue(todo: list[dict], args: argparse.Namespace, prefix: str) -> None:
    if len(todo) == len(args.models) * len(args.strategies) * len(args.seeds):
        # The whole grid: DVC's own sweep queues the product in one command, named prefix-1, prefix-2, ...
        # (prefix alone for a single cell)
        sweep = [f"{key}={','.join(map(protocols.value_text, values))}"
                 for key, values in (("model", args.models), ("strategy", args.strategies), ("seed", args.seeds))]
        dvc("exp", "run", "--queue", "--name", prefix, *settings(args.overrides), *_flags(sweep))
        return
    # Cells already done, or another machine's shard, leave no product to sweep: one command per cell
    for cell in todo:
        short = {"feature_extraction": "fe", "finetune": "ft"}[cell["strategy"]]
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{prefix}-{cell['model']}-{short}-s{cell['seed']}")
        dvc("exp", "run", "--queue", "--name", name, *settings(cell))


def settings(overrides: dict) -> list[str]:
    return _flags(f"{key}={protocols.value_text(value)}" for key, value in overrides.items())


def _flags(pairs) -> list[str]:
    return [arg for pair in pairs for arg in ("-S", pair)]


def ours(records: list[dict], prefix: str, pending: list[dict], workspace: dict) -> list[str]:
    """The names of the experiments this study waits for: those it queued, and one for each pending
    cell, which an earlier run of the study left queued or running."""
    names = {r["name"] for r in records if r["name"] == prefix or r["name"].startswith(prefix + "-")}
    for cell in pending:
        waiting = [r for r in matching(cell, workspace, records) if r["state"] in ("queued", "running")]
        names.update(r["name"] for r in waiting[:1])
    return sorted(names)


def run_queue(names: list[str], gpus: list[str]) -> None:
    """Starts one queue worker per GPU and waits for the experiments, with a progress bar.

    `dvc queue start -j k` starts the workers numbered 1..k that are not alive, each a daemon that
    inherits our environment and runs one experiment at a time. So worker k+1 starts, with its own
    CUDA_VISIBLE_DEVICES, only once k experiments run: then workers 1..k are alive and only it is new.
    A worker stops after 10 s with nothing queued; until then one left by an earlier study keeps
    that study's GPU, and this one counts it among its own.
    """
    workers, quiet, last = 0, 0, None
    with tqdm(total=len(names), desc="experiments", unit="exp") as bar:
        while True:
            states, pids = experiment_states(names)
            finished = sum(state in ("success", "failed", None) for state in states.values())
            bar.update(finished - bar.n)
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
                                 "`dvc queue status`); python -m stages.report shows what finished")
            last = snapshot
            time.sleep(POLL_SECONDS)


def experiment_states(names: list[str]) -> tuple[dict, list]:
    """From `dvc exp show --json`: {name: state} of ours (None: gone), and the pid of every running
    experiment's process (None while it sets up)."""
    shown, pids = {}, []
    for experiment in (e for baseline in report.exp_show() for e in baseline.get("experiments") or []):
        executor = experiment.get("executor") or {"state": "success"}
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
    states, _ = experiment_states(names)
    queued = [name for name, state in states.items() if state == "queued"]
    running = [name for name, state in states.items() if state == "running"]
    if queued:
        dvc("queue", "remove", *queued)
    if running:
        dvc("queue", "kill", "--force", *running)
    dvc("queue", "stop")
    print(f"stopped: {len(running)} running experiment(s) killed and {len(queued)} queued one(s) removed; "
          "run the same command again to resume (finished cells are not run again)", file=sys.stderr)
    sys.exit(130)


def record_for(cell: dict, workspace: dict, records: list[dict]) -> dict:
    """The cell's best experiment (report.best); a cell with none keeps its row, not run."""
    found = matching(cell, workspace, records)
    if found:
        return report.best(found)
    return {"name": "-", "state": None, "params": report.nest(expected(cell, workspace)), "metrics": {},
            "error": f"{report.NOT_RUN}no experiment found", "log": None}


def main():
    args = parse_args()
    shown = report.exp_show()
    workspace = report.workspace_params(shown)
    unknown = [key for key in args.overrides if key not in flat(workspace)]
    if unknown:
        raise UserError(f"-S {unknown[0]}: no such key in params.yaml")
    cells = grid(args.models, args.strategies, args.seeds, args.overrides)
    fine_tunes = "finetune" in args.strategies
    processes = {**flat(workspace), **args.overrides}.get("finetune.processes", 1) if fine_tunes else 1
    gpus = gpu_groups(args.gpus, processes)
    mine = shard(cells, *args.shard)
    done, pending, todo = plan(mine, workspace, report.experiments(shown))
    share = f"shard {args.shard[0]}/{args.shard[1]}: {len(mine)} of {len(cells)} cells; " if args.shard[1] > 1 else ""
    print(f"{share}{len(done)} of {len(mine)} experiments already done; queueing {len(todo)}"
          + (f"; waiting for {len(pending)} already queued or running" if pending else ""))
    prefix = time.strftime("study-%Y%m%d-%H%M%S")  # names stay unique when the study runs again
    try:
        if todo:
            queue(todo, args, prefix)
        names = ours(report.experiments(report.exp_show()), prefix, pending, workspace)
        if names:
            print(f"running on {'; '.join(f'GPU {g}' for g in gpus) or 'one worker, no GPU'}")
            run_queue(names, gpus)
            dvc("queue", "remove", "--success")  # the experiments stay in `dvc exp show`; only the queue's list clears
    except KeyboardInterrupt:
        stop(ours(report.experiments(report.exp_show()), prefix, pending, workspace))

    finished = report.experiments(report.exp_show())
    records = [record_for(cell, workspace, finished) for cell in mine]
    report.write_report(report.results_table(records), records)
    print((report.OUT / "results.md").read_text())
    failures = [f"{r['name']}: {r['error']}" for r in records if r["error"]]
    if failures:
        raise SystemExit(f"error: {len(failures)} experiment(s) failed: " + "; ".join(failures))


if __name__ == "__main__":
    run_stage(main)
