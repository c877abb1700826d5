"""The study's results table and bar chart, read back from DVC's experiments.

    python -m stages.report                              # every experiment that `dvc exp show` lists
    python -m stages.report --models alexnet --seeds 0,1 # only those

Reads `dvc exp show --json`, never private files: each experiment's params.yaml and
metrics/metrics.json as DVC committed them. Writes study/results.{md,csv} and
study/accuracy.png, with the study's published accuracy beside each row.
"""
import argparse
import json
import subprocess
from pathlib import Path

import pandas as pd

from stages import figures

OUT = Path("study")
# The study we start from: Adam, lr 1e-3, batch 64, 20 epochs, CIFAR-10 at 224 px.
PUBLISHED = {("alexnet", "feature_extraction"): 0.8132, ("alexnet", "finetune"): 0.8917,
             ("vgg16", "feature_extraction"): 0.8196, ("vgg16", "finetune"): 0.9223}


def dvc_experiments() -> list[dict]:
    """One record per experiment: name, params (nested), metrics (nested), error."""
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True, capture_output=True,
                                      text=True).stdout)
    records = []
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                records.append(_record(rev))
    return records


def _record(rev: dict) -> dict:
    data = rev.get("data") or {}
    params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
    metrics = (data.get("metrics") or {}).get("metrics/metrics.json", {}).get("data", {})
    error = rev.get("error") or data.get("error")
    if isinstance(error, dict):
        error = error.get("msg") or "failed"
    if not error and data.get("status") not in (None, "Success"):
        error = data["status"]  # Failed, or still Queued / Running
    return {"name": rev.get("name") or rev["rev"][:7], "params": params, "metrics": metrics, "error": error}


def lookup(nested: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(nested, dict) or key not in nested:
            return None
        nested = nested[key]
    return nested


def results_table(records: list[dict]) -> pd.DataFrame:
    """One row per model × strategy, mean ± std over the seeds that ran; failures kept as rows."""
    rows = [{"model": r["params"].get("model"), "strategy": r["params"].get("strategy"),
             "seed": r["params"].get("seed"), "experiment": r["name"], "error": r["error"],
             "accuracy": lookup(r["metrics"], "test.accuracy"),
             "train_time_s": lookup(r["metrics"], "train.time_s"),
             "train_images_per_s": lookup(r["metrics"], "train.images_per_s"),
             "test_images_per_s": lookup(r["metrics"], "test.images_per_s"),
             "trainable_params": lookup(r["metrics"], "train.trainable_params"),
             "device": lookup(r["metrics"], "run.device")} for r in records]
    runs = pd.DataFrame(rows)
    runs.loc[runs["accuracy"].isna() & runs["error"].isna(), "error"] = "no metrics"
    table = runs.groupby(["model", "strategy"], sort=True).agg(
        seeds=("seed", lambda s: ",".join(map(str, sorted(s)))),
        runs_ok=("accuracy", "count"),
        accuracy_mean=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        train_time_s=("train_time_s", "mean"), train_images_per_s=("train_images_per_s", "mean"),
        test_images_per_s=("test_images_per_s", "mean"), trainable_params=("trainable_params", "first"),
        failed=("error", lambda e: "; ".join(f"{n}: {m}" for n, m in zip(runs.loc[e.index, "experiment"], e)
                                              if isinstance(m, str)))).reset_index()
    table["published_accuracy"] = [PUBLISHED.get((m, s)) for m, s in zip(table["model"], table["strategy"])]
    return table


def provenance(records: list[dict]) -> str:
    """Where the numbers come from: data source, weights, image size and device of each run."""
    seen = sorted({(str(lookup(r["params"], "data.source")), str(lookup(r["params"], "data.root")),
                    str(r["params"].get("weights")), str(lookup(r["params"], "data.image_size")),
                    str(lookup(r["metrics"], "run.device"))) for r in records if r["metrics"]})
    return "\n".join(f"- data: {s} ({root}), weights: {w}, image size: {size} px, device: {d}"
                     for s, root, w, size, d in seen)


def write_report(table: pd.DataFrame, records: list[dict], folder: Path = OUT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "results.csv", index=False)
    shown = table.assign(
        accuracy=[_mean_std(m, s, n) for m, s, n in zip(table["accuracy_mean"], table["accuracy_std"], table["runs_ok"])],
        published=table["published_accuracy"].map(lambda a: "" if pd.isna(a) else f"{a:.4f}"),
        train_time_s=table["train_time_s"].round(1), train_images_per_s=table["train_images_per_s"].round(0),
        test_images_per_s=table["test_images_per_s"].round(0),
        trainable_params=table["trainable_params"].map(lambda n: "" if pd.isna(n) else f"{int(n):,}"))
    columns = ["model", "strategy", "seeds", "accuracy", "published", "train_time_s", "train_images_per_s",
               "test_images_per_s", "trainable_params", "failed"]
    shown = shown[columns].astype(object).where(shown[columns].notna(), "")
    markdown = shown.to_markdown(index=False)  # pandas uses tabulate, which dvc installs
    (folder / "results.md").write_text(
        "# Study results\n\nTest accuracy as mean ± std over seeds; published: the study we start from.\n\n"
        f"{markdown}\n\n## Provenance\n{provenance(records)}\n")
    figures.study_bars(table, folder / "accuracy.png")


def _mean_std(mean, std, count) -> str:
    if pd.isna(mean):
        return "failed"
    return f"{mean:.4f}" if count < 2 else f"{mean:.4f} ± {std:.4f}"


def select(records: list[dict], models=None, strategies=None, seeds=None, overrides=None) -> list[dict]:
    """The records whose params match the given values; overrides are dotted keys."""
    wanted = dict(overrides or {})
    chosen = []
    for r in records:
        if models and r["params"].get("model") not in models:
            continue
        if strategies and r["params"].get("strategy") not in strategies:
            continue
        if seeds is not None and r["params"].get("seed") not in seeds:
            continue
        if all(lookup(r["params"], k) == v for k, v in wanted.items()):
            chosen.append(r)
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated; default: all")
    parser.add_argument("--strategies", help="comma-separated; default: all")
    parser.add_argument("--seeds", help="comma-separated; default: all")
    args = parser.parse_args()
    records = select(dvc_experiments(), models=args.models and args.models.split(","),
                     strategies=args.strategies and args.strategies.split(","),
                     seeds=args.seeds and [int(s) for s in args.seeds.split(",")])
    if not records:
        raise SystemExit("error: no DVC experiments match: run python -m stages.study first")
    write_report(results_table(records), records)
    print((OUT / "results.md").read_text())


if __name__ == "__main__":
    main()
