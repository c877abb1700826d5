"""The whole model × strategy (× seed) grid as queued DVC experiments, then the report.

    python -m stages.study                                    # alexnet,vgg16 × both strategies, seed 0
    python -m stages.study --seeds 0,1,2                      # mean ± std over three seeds
    python -m stages.study --models timm/tf_efficientnet_lite0 -S data.source=imagefolder \
        -S data.root=/path/to/images -S weights=/path/to/lite0.pth -S data.image_size=96

Each cell is `dvc exp run --queue -S model=… -S strategy=… -S seed=… [-S …]`; then
`dvc queue start` runs them, one at a time by default (--jobs), in temporary copies of the repo
that share DVC's cache and run-cache. A cell that already has a successful experiment with the
same params is not queued again. The report (stages/report.py) then reads the experiments back
with `dvc exp show --json`. Paths given with -S are made absolute, since queued experiments
run in another folder.
"""
import argparse
import re
import subprocess
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from stages import report

PATH_KEYS = ("data.root", "weights")
POLL_SECONDS = 5


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"error: -S {pair} must be key=value, e.g. -S data.image_size=96")
        value = yaml.safe_load(text)
        if key in PATH_KEYS and isinstance(value, str) and Path(value).exists():
            value = str(Path(value).resolve())
        overrides[key] = value
    return overrides


def grid(models: list[str], strategies: list[str], seeds: list[int], overrides: dict) -> list[dict]:
    return [{"model": m, "strategy": s, "seed": seed, **overrides} for m in models for s in strategies for seed in seeds]


def experiment_name(cell: dict, stamp: str) -> str:
    short = {"feature_extraction": "fe", "finetune": "ft"}[cell["strategy"]]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{cell['model']}-{short}-s{cell['seed']}-{stamp}")


def queue(cell: dict, stamp: str) -> str:
    name = experiment_name(cell, stamp)
    settings = [arg for key, value in cell.items() for arg in ("-S", f"{key}={_yaml(value)}")]
    subprocess.run(["dvc", "exp", "run", "--queue", "--name", name, *settings], check=True)
    return name


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def run_queue(names: list[str], jobs: int) -> None:
    """`dvc queue start`, then waits for our experiments, with a progress bar."""
    subprocess.run(["dvc", "queue", "start", "--jobs", str(jobs)], check=True)
    with tqdm(total=len(names), desc="experiments", unit="exp") as bar:
        while True:
            status = queue_status()
            finished = sum(status.get(n) in ("Success", "Failed") for n in names)
            bar.update(finished - bar.n)
            if finished == len(names) or not any(status.get(n) in ("Queued", "Running") for n in names):
                return
            time.sleep(POLL_SECONDS)


def queue_status() -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    lines = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True).stdout.splitlines()
    statuses = {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[-1] in ("Queued", "Running", "Success", "Failed"):
            statuses[fields[1]] = fields[-1]
    return statuses


def failure_reason(name: str) -> str:
    """The last error line that the failed experiment printed."""
    logs = subprocess.run(["dvc", "queue", "logs", name], capture_output=True, text=True).stdout
    ours = [line.strip() for line in logs.splitlines() if line.lstrip().startswith("error: ")]  # run_stage's
    dvcs = [line.strip() for line in logs.splitlines() if line.lstrip().startswith("ERROR: ")]
    return (ours or dvcs or [f"failed (see dvc queue logs {name})"])[-1]


def record_of(cell: dict, experiments: list[dict], failed: dict, queued: dict) -> dict:
    """The cell's successful experiment, else its failed one: a failure never drops out of the table."""
    matching = report.select(experiments, overrides=cell)
    successes = [r for r in matching if not r["error"]]
    if successes or matching:
        return (successes or matching)[0]
    name = next((n for n, c in queued.items() if c == cell), "not run")
    return {"name": name, "params": cell, "metrics": {}, "error": failed.get(name, "no experiment found")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="alexnet,vgg16")
    parser.add_argument("--strategies", default="feature_extraction,finetune")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="passed to every experiment; repeatable")
    parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (one GPU: keep 1)")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    cells = grid(args.models.split(","), args.strategies.split(","), [int(s) for s in args.seeds.split(",")],
                 overrides)

    done = [r for r in report.dvc_experiments() if not r["error"]]
    todo = [c for c in cells if not report.select(done, overrides=c)]
    print(f"{len(cells) - len(todo)} of {len(cells)} experiments already done; queueing {len(todo)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")  # names stay unique when the study runs again
    names = [queue(cell, stamp) for cell in todo]
    if names:
        run_queue(names, args.jobs)
    failed = {n: failure_reason(n) for n, s in queue_status().items() if n in names and s == "Failed"}

    experiments = report.dvc_experiments()
    for record in experiments:
        record["error"] = failed.get(record["name"], record["error"])
    records = [record_of(cell, experiments, failed, dict(zip(names, todo))) for cell in cells]
    report.write_report(report.results_table(records), records)
    print((report.OUT / "results.md").read_text())
    failures = [f"{r['name']}: {r['error']}" for r in records if r["error"]]
    if failures:
        raise SystemExit(f"error: {len(failures)} experiment(s) failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
