"""The whole model × strategy × seed grid as queued DVC experiments, one per GPU at a time, then the report.

    python -m stages.study                                    # alexnet,vgg16 × both strategies, seed 0
    python -m stages.study --seeds 0,1,2 --protocol readme    # the README's protocol, mean ± std over 3 seeds
    python -m stages.study --gpus 0,1,2,3                     # up to four experiments at once, one per GPU
    python -m stages.study --gpus 0+1,2+3 -S finetune.processes=2   # two GPUs for each fine-tune
    python -m stages.study --shard 1/2 --remote origin        # this machine's half of the grid; another runs 2/2
    python -m stages.study --models timm/tf_efficientnet_lite0 -S data.source=imagefolder \\
        -S data.root=/path/to/images -S weights=/path/to/lite0.pth -S data.image_size=96
    python -m stages.study --strategies feature_extraction,finetune,lp_ft,scratch -S data.train_per_class=10,100,1000
        # the transfer curve: each strategy at each training-set size, against training from scratch
    python -m stages.study --models timm/tf_efficientnet_lite0,timm/tf_efficientnet_lite2 -S weights=../shared/weights
        # a folder of weights: each model its own file (<model>.pth or <model>.<tag>.pth)

Each cell is one experiment queued with `dvc exp run --queue`, named by its model, strategy,
seed and a hash of its params and commit (the same on every machine): the protocol's overrides
(protocols.yaml, default notebook; for scratch, its scratch recipe on top), then the -S flags,
which win, then the cell's model, strategy and seed. A scratch cell fine-tunes from random
weights (weights: none, whatever -S weights says). `-S key=a,b,c` (or `range(...)`, Hydra's
sweep syntax, as `dvc exp run -S` takes it) multiplies the cells of each strategy whose stages
read that key (dvc.yaml's params), and every cell is validated before anything is queued.
DVC runs each in its own temporary copy of the repository, sharing the cache and run-cache. One
queue worker per GPU (`dvc queue start`, started with CUDA_VISIBLE_DEVICES set to its GPU, or to
its group of GPUs for a fine-tune under torchrun) runs its experiments one
after another, so no two share a GPU and the GPU never becomes a param; with no GPU, one worker.
A cell whose params (the workspace's params.yaml with the cell's overrides) already have a
successful experiment is not run again; one still queued or running is waited for. Every state
comes from `dvc exp show --json`. The report (report.py) then writes study/; the command
exits non-zero if an experiment failed. Paths given with -S are made absolute, since queued
experiments run in another folder. With --remote (remotes.py), the study first pulls the
remote's experiments of this commit and the run-cache, and pushes each experiment as it succeeds;
a machine that died is restarted with the same command, and its experiments left "running" are
run again. Without --shard, a SLURM array or a Kubernetes indexed Job gives the shard (launch/);
a shard with no cells (more tasks than cells) says so in one line and exits 0.
"""
import argparse
import itertools
import os
import re
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
import yaml

from stages import check_inputs
from stages.pipeline import param_checks, params
from stages.pipeline.errors import UserError
from stages.study import experiments, protocols, queue, remotes, report
from stages.study.experiments import dvc, flat
from stages.study.options import OneLineParser, comma_list, seed_list

STRATEGIES = ("feature_extraction", "finetune", "lp_ft", "scratch")  # scratch: fine-tuning from random weights
DEFAULT_STRATEGIES = ("feature_extraction", "finetune")  # the published study's two
GRID_KEYS = ("model", "strategy", "seed")  # set by --models, --strategies and --seeds
STAGES_OF = {"feature_extraction": ("prepare-data", "cache-features", "train-heads", "evaluate"),
             "finetune": ("prepare-data", "finetune", "evaluate"),  # the stages whose params a cell's key can be
             "lp_ft": ("prepare-data", "cache-features", "train-heads", "finetune", "evaluate")}
STAGES_OF["scratch"] = STAGES_OF["finetune"]
NOT_SWEPT_FOR = {"scratch": ("weights",)}  # scratch cells keep weights: none
PATH_KEYS = ("data.root", "weights")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m stages.study", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="alexnet,vgg16", help="comma-separated")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help=f"comma-separated, of {', '.join(STRATEGIES)}")
    parser.add_argument("--seeds", default="0", help="comma-separated integers >= 0")
    parser.add_argument("--protocol", default=protocols.PUBLISHED_PROTOCOL, choices=list(protocols.PROTOCOLS),
                        help="the override set of stages/study/protocols.yaml applied to every cell; -S wins over it")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="passed to every experiment, as dvc exp run -S reads it; repeatable; "
                                                  "KEY=a,b,c or KEY=range(start,stop,step) sweeps it")
    parser.add_argument("--gpus", help="comma-separated GPU ids, one experiment on each at a time, or groups "
                                       "such as 0+1,2+3 for a fine-tune with finetune.processes: 2; default: "
                                       "every visible GPU (grouped so), or one experiment at a time with none")
    parser.add_argument("--shard", metavar="I/N",
                        help="run the I-th of N equal shares of the grid (each machine one share); default: from "
                             "SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX when set, else 1/1")
    parser.add_argument("--remote", metavar="GIT_REMOTE",
                        help="pull its experiments first (a cell done elsewhere is done), push each one finished "
                             "here, with data and run-cache going to the default DVC remote")
    args = parser.parse_args(argv)
    args.models = comma_list("--models", args.models)
    args.strategies = comma_list("--strategies", args.strategies)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise UserError(f"--strategies: unknown {', '.join(unknown)} (known: {', '.join(STRATEGIES)})")
    args.seeds = seed_list(args.seeds)
    args.gpus = None if args.gpus is None else comma_list("--gpus", args.gpus)
    args.shard, args.shard_source = shard_and_source(args.shard)
    given = parse_overrides(args.overrides)
    args.sweeps = {key: values for key, values in given.items() if len(values) > 1}
    mine = {key: values[0] for key, values in given.items() if len(values) == 1}
    args.overrides = {**protocols.overrides(args.protocol), **mine}
    args.scratch_overrides = {**protocols.overrides(args.protocol, scratch=True), **mine}
    return args


def shard_and_source(option: str | None) -> tuple[tuple[int, int], str]:
    """--shard, else the scheduler's array index (SLURM, Kubernetes), else the whole grid."""
    if option is not None:
        return parse_shard(option), "--shard"
    found = remotes.shard_from_environment()
    if found is None:
        return (1, 1), "one machine"
    index, count, source = found
    return parse_shard(f"{index}/{count}", source), source


def parse_shard(text: str, source: str = "--shard") -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise UserError(f"{source}: shard {text} must be I/N with 1 <= I <= N, e.g. 1/2")
    return int(match[1]), int(match[2])


def parse_overrides(pairs: list[str]) -> dict[str, list]:
    """{dotted key: its values}, each read as DVC reads -S (Hydra's grammar, so 1e-3 is a float);
    a sweep (a,b,c or range(...)) gives several."""
    parser = OverridesParser.create()
    overrides = {}
    for pair in pairs:
        try:
            override = parser.parse_override(pair)
            key = override.key_or_group
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except HydraException as error:
            raise UserError(f"-S {pair}: not key=value nor key=a,b,c ({str(error).splitlines()[0]})") from None
        if "=" not in pair or override.type != OverrideType.CHANGE or override.package is not None:
            raise UserError(f"-S {pair}: must be key=value, e.g. -S data.image_size=96")
        if key in GRID_KEYS:
            raise UserError(f"-S {pair}: {key} is set by --{key}s")
        if not values or len(set(map(repr, values))) != len(values):
            raise UserError(f"-S {pair}: a sweep needs distinct values, e.g. -S {key}=10,100")
        if any(isinstance(value, (list, dict)) for value in values):
            raise UserError(f"-S {pair}: a string, number, boolean or null, not a list or mapping")
        if key in PATH_KEYS:
            values = [str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists() else v for v in values]
        overrides[key] = values
    return overrides


def grid(models: list[str], strategies: list[str], seeds: list[int], overrides: dict, sweeps: dict | None = None,
         scratch_overrides: dict | None = None, pipeline: dict | None = None) -> list[dict]:
    """model × strategy × swept values × seed. A swept key multiplies only the strategies whose stages
    read it (`pipeline`: dvc.yaml); a scratch cell is a fine-tune from weights: none."""
    cells = []
    for model, strategy in itertools.product(models, strategies):
        swept = {key: values for key, values in (sweeps or {}).items() if applies(key, strategy, pipeline)}
        base = scratch_overrides if strategy == "scratch" and scratch_overrides is not None else overrides
        for values, seed in itertools.product(itertools.product(*swept.values()), seeds):
            cell = {**base, **dict(zip(swept, values)), "model": model, "strategy": strategy, "seed": seed}
            if strategy == "scratch":
                cell.update(strategy="finetune", weights="none")
            cells.append(cell)
    return cells


def applies(key: str, strategy: str, pipeline: dict | None) -> bool:
    """Whether a stage of the strategy lists the key, or a section above it, among its params in dvc.yaml."""
    if key in NOT_SWEPT_FOR.get(strategy, ()):
        return False
    stages = (pipeline or {}).get("stages", {})
    listed = [p for name in STAGES_OF[strategy] for p in stages.get(name, {}).get("params", [])]
    return any(key == p or key.startswith(f"{p}.") for p in listed)


def validate(cell: dict, workspace: dict, sweeps: dict) -> None:
    """The cell's whole params.yaml through params' validation; a mistake names the swept value, if any."""
    try:
        check_inputs.check_train_per_class(param_checks.validate(experiments.nest(expected(cell, workspace))).data)
    except params.ParamError as error:
        swept = ", ".join(f"{key}={cell[key]!r}" for key in sweeps if key in cell)
        raise UserError(error.problem + (f" in the cell with {swept}" if swept else "") + ": fix the -S value") from None


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
    malformed = [i for i in ids if not re.fullmatch(r"\d+|(GPU|MIG)-[\w/-]+", i)]
    if malformed:
        raise UserError(f"--gpus {','.join(gpus)}: {malformed[0]!r} names no GPU: give indices (0,1) or UUIDs "
                        "(GPU-...), as `nvidia-smi -L` lists them")
    visible = visible_gpus()
    if not visible:  # still useful: the queue's per-GPU workers, each with its CUDA_VISIBLE_DEVICES, on the CPU
        print(f"warning: no GPU is visible here: --gpus {','.join(gpus)} starts {len(groups)} workers on the CPU",
              file=sys.stderr)
    # indices against indices; a UUID given where the GPUs are named by index is CUDA's to resolve
    absent = [i for i in ids if visible and i.isdigit() == visible[0].isdigit() and i not in visible]
    if absent:
        raise UserError(f"--gpus {','.join(gpus)}: GPU {absent[0]} is not one of this machine's "
                        f"({','.join(visible)}, as CUDA_VISIBLE_DEVICES names them)")
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
        state = experiments.most_advanced(matching(cell, workspace, records) or [{"state": None}])["state"]
        {"success": done, "queued": pending, "running": pending}.get(state, todo).append(cell)
    return done, pending, todo


def matching(cell: dict, workspace: dict, records: list[dict]) -> list[dict]:
    """The experiments whose every param is the cell's: the workspace's params.yaml with its overrides."""
    wanted = expected(cell, workspace)
    return [r for r in records if flat(r["params"]) == wanted]


def expected(cell: dict, workspace: dict) -> dict:
    return {**flat(workspace), **{k: tuple(v) if isinstance(v, list) else v for k, v in cell.items()}}


def waited_for(pending: list[dict], todo: list[dict], names: dict[int, str], workspace: dict,
               records: list[dict]) -> list[str]:
    """The experiments this study waits for: those it queues, and for each pending cell the
    experiment that an earlier run of the study left queued or running."""
    waiting = [r["name"] for cell in pending for r in matching(cell, workspace, records)[:1]
               if r["state"] in ("queued", "running")]
    return sorted({*waiting, *(names[id(cell)] for cell in todo)})


def record_for(cell: dict, workspace: dict, records: list[dict]) -> dict:
    """The cell's most advanced experiment (a success first); a cell with none keeps its row, not run."""
    found = matching(cell, workspace, records)
    if found:
        return experiments.most_advanced(found)
    return {"name": "-", "state": None, "params": experiments.nest(expected(cell, workspace)), "metrics": {},
            "error": f"{experiments.NOT_RUN}no experiment found", "log": None}


def main():
    args = parse_args()
    if args.remote:
        remotes.check(args.remote)
    shown = experiments.exp_show()
    workspace = experiments.workspace_params(shown)
    cells = validated_cells(args, workspace)
    mine = shard(cells, *args.shard)
    if not mine:  # a scheduler's array with more tasks than cells: the other tasks have them all
        print(f"shard {args.shard[0]}/{args.shard[1]} ({args.shard_source}): no cells, the grid has only "
              f"{len(cells)}: nothing to do")
        return
    if args.remote:
        remotes.pull(args.remote)  # a cell that another machine finished is done here too
        shown = experiments.exp_show()
    sharing = Sharing(args.remote)
    run_cells(args, mine, len(cells), workspace, experiments.records(shown), sharing)
    finish(mine, workspace, sharing)


def validated_cells(args: argparse.Namespace, workspace: dict) -> list[dict]:
    """The grid's cells, each validated as check-inputs would, before anything is queued."""
    unknown = [key for key in [*args.overrides, *args.sweeps] if key not in flat(workspace)]
    if unknown:
        raise UserError(f"-S {unknown[0]}: no such key in params.yaml")
    pipeline = yaml.safe_load(Path("dvc.yaml").read_text())
    cells = grid(args.models, args.strategies, args.seeds, args.overrides, args.sweeps, args.scratch_overrides,
                 pipeline)
    for cell in cells:
        validate(cell, workspace, args.sweeps)
    return cells


class Sharing:
    """With --remote, each experiment pushed the moment it succeeds, so that nothing is lost if this
    machine dies next; a failed push is kept to be told at the end."""
    def __init__(self, remote: str | None):
        self.remote, self.pushed, self.failures = remote, set(), []

    def __call__(self, finished: list[str]) -> None:
        new = sorted(set(finished) - self.pushed)
        if not self.remote or not new:
            return
        try:
            remotes.push(self.remote, new)
            self.pushed.update(new)
            print(f"pushed {', '.join(new)} to {self.remote}", flush=True)
        except (UserError, experiments.DvcFailed) as error:
            self.failures.append(str(error).removeprefix("error: "))


def run_cells(args: argparse.Namespace, mine: list[dict], total: int, workspace: dict, records: list[dict],
              share: Sharing) -> None:
    """Queues this shard's cells that have no experiment yet and waits for them (and for those an earlier
    run left queued or running), one queue worker per GPU (group)."""
    fine_tunes = bool({"finetune", "lp_ft", "scratch"} & set(args.strategies))
    processes = {**flat(workspace), **args.overrides}.get("finetune.processes", 1) if fine_tunes else 1
    gpus = gpu_groups(args.gpus, processes)
    baseline = remotes.baseline_commit()
    names = {id(cell): remotes.cell_name(cell, expected(cell, workspace), baseline) for cell in mine}
    records = queue.fail_dead_runs(records)
    done, pending, todo = plan(mine, workspace, records)
    print(f"shard {args.shard[0]}/{args.shard[1]} ({args.shard_source}): {len(mine)} of {total} cells; "
          f"{len(done)} already done; queueing {len(todo)}"
          + (f"; waiting for {len(pending)} already queued or running" if pending else ""))
    share([record_for(cell, workspace, records)["name"] for cell in done])  # finished before a restart
    try:
        if todo:
            queue.enqueue(todo, names, records)
        waiting = waited_for(pending, todo, names, workspace, experiments.records(experiments.exp_show()))
        if waiting:
            print(f"running on {'; '.join(f'GPU {g}' for g in gpus) or 'one worker, no GPU'}")
            queue.run_queue(waiting, gpus, share)
            dvc("queue", "remove", "--success")  # the experiments stay in `dvc exp show`; only the queue's list clears
    except KeyboardInterrupt:
        queue.stop(waited_for(pending, todo, names, workspace, experiments.records(experiments.exp_show())))


def finish(mine: list[dict], workspace: dict, share: Sharing) -> None:
    """The report of this shard's cells; exit non-zero if an experiment or a push failed."""
    finished = experiments.records(experiments.exp_show())
    results = [record_for(cell, workspace, finished) for cell in mine]
    share([r["name"] for r in results if r["state"] == "success"])
    report.write(results)
    print((report.OUT / "results.md").read_text())
    failures = [f"{r['name']}: {r['error']}" for r in results if r["error"]]
    if failures:
        raise SystemExit(f"error: {len(failures)} experiment(s) failed: " + "; ".join(failures))
    if share.failures:
        raise SystemExit(f"error: {len(share.failures)} push(es) to {share.remote} failed: " + "; ".join(share.failures))
