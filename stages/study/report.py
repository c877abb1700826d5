"""The study's results table and charts, read back from DVC's experiments.

    python -m stages.study.report                               # every experiment of the commit checked out
    python -m stages.study.report --models alexnet --seeds 0,1  # only those
    python -m stages.study.report --all-commits                 # also those made at earlier commits
    python -m stages.study.report --remote origin               # first pulls the experiments other machines pushed
                                                                # (their git refs; metrics read from the DVC remote)

Reads `dvc exp show --json` only (experiments.py), tables it (table.py: one row per set of params
but the seed, so that runs made under different settings never average together; a column names
the settings that differ between the rows) and draws it (charts.py). Writes study/results.{md,csv},
study/accuracy.png (a bar per row), study/cost_accuracy.png (test accuracy against each row's
whole cost) and, where a numeric param was swept, study/curve.png (test accuracy against it,
the training-set size first) with each strategy's gain over scratch in results.md.
"""
import argparse
from pathlib import Path

import pandas as pd

from stages.pipeline import figures
from stages.pipeline.errors import UserError, run_stage
from stages.study import charts, experiments, remotes, table
from stages.study.options import OneLineParser, comma_list, seed_list
from stages.study.protocols import strategy_of

OUT = Path("study")


def select(records: list[dict], models=None, strategies=None, seeds=None) -> list[dict]:
    """The records of the given models, strategies and seeds (None: all)."""
    return [r for r in records if (not models or r["params"].get("model") in models)
            and (not strategies or strategy_of(r["params"]) in strategies)
            and (seeds is None or r["params"].get("seed") in seeds)]


def write(records: list[dict], folder: Path = OUT) -> None:
    """study/results.{md,csv} and the two charts, from the experiments' records (experiments.records)."""
    runs = table.runs(records)
    results = table.results(runs)
    folder.mkdir(parents=True, exist_ok=True)
    results.to_csv(folder / "results.csv", index=False)
    shown = results.assign(
        accuracy=[_mean_std(m, s, n, f) for m, s, n, f in
                  zip(results["accuracy_mean"], results["accuracy_std"], results["runs_ok"], results["failed"])],
        published=[note or f"{a:.4f}" for a, note in zip(results["published_accuracy"], results["published_note"])],
        time_s=[_time(*parts) for parts in zip(results["total_time_s"], results["features_time_s"],
                                               results["train_time_s"], results["evaluate_time_s"])],
        train_images_per_s=results["train_images_per_s"].round(0),
        trainable_params=results["trainable_params"].map(lambda n: "" if pd.isna(n) else f"{int(n):,}"),
        strategy=results["strategy"].map(lambda s: charts.STRATEGY_SHORT.get(s, s)))
    columns = ["model", "strategy", "protocol", "settings", "seeds", "accuracy", "published", "time_s",
               "train_images_per_s", "trainable_params", "problems"]
    if not results["settings"].any():
        columns.remove("settings")
    shown = shown[columns].astype(object).where(shown[columns].notna(), "")
    markdown = shown.to_markdown(index=False)  # pandas uses tabulate, which dvc installs
    key = table.curve_key(results)
    (folder / "results.md").write_text(
        "# Study results\n\nTest accuracy as mean ± std over seeds, one row per set of params but the seed. "
        "published: the study's number, where the row ran its notebook's protocol on the same data, weights "
        "and image size, else why it does not compare. time_s: the whole cost of a run, feature cache "
        "+ training + evaluation (lp_ft: + its probe).\n\n"
        f"{markdown}\n\n{gains_section(results, key)}## Provenance\n{table.provenance(runs)}\n")
    figures.save(charts.study_bars(results), folder / "accuracy.png")
    figures.save(charts.cost_accuracy(results), folder / "cost_accuracy.png")
    (folder / "curve.png").unlink(missing_ok=True)  # a curve from an earlier study would pass for this one's
    if key:
        figures.save(charts.transfer_curve(results, key), folder / "curve.png")


def gains_section(results: pd.DataFrame, key: str | None) -> str:
    """results.md's table of each strategy's gain over scratch per value of the swept key, if both exist."""
    if not key or "scratch" not in set(results["strategy"]):
        return ""
    gains = table.gains_over_scratch(results, key).assign(
        test_accuracy=lambda t: t["test_accuracy"].map("{:.4f}".format),
        gain_over_scratch=lambda t: t["gain_over_scratch"].map(lambda g: "" if pd.isna(g) else f"{g:+.1f}"),
        time_s=lambda t: t["time_s"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
        strategy=lambda t: t["strategy"].map(lambda s: charts.STRATEGY_SHORT.get(s, s)))
    return (f"## Gain over training from scratch, per {key}\n\nTest accuracy (mean over the seeds), its gain "
            "in points over the scratch row of the same model, protocol and settings, and the whole cost of "
            f"one run (s). The curve: curve.png.\n\n{gains.to_markdown(index=False, disable_numparse=True)}\n\n")


def _mean_std(mean, std, count, failed) -> str:
    if pd.isna(mean):
        return "failed" if failed else "not run"
    return f"{mean:.4f}" if count < 2 else f"{mean:.4f} ± {std:.4f}"


def _time(total, *parts) -> str:
    """The whole cost, and its parts where every one was recorded (evaluation's since evaluate times itself)."""
    if pd.isna(total):
        return ""
    return f"{total:.1f}" if any(pd.isna(p) for p in parts) else f"{total:.1f} ({' + '.join(f'{p:.1f}' for p in parts)})"


def main():
    parser = OneLineParser(prog="python -m stages.study.report", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated; default: all")
    parser.add_argument("--strategies", help="comma-separated; default: all")
    parser.add_argument("--seeds", help="comma-separated; default: all")
    parser.add_argument("--all-commits", action="store_true",
                        help="the experiments of every commit, not only of the one checked out (dvc exp show -A)")
    parser.add_argument("--remote", metavar="GIT_REMOTE",
                        help="pull its experiments (of this commit, or of every one with --all-commits) first")
    args = parser.parse_args()
    chosen = {"models": args.models and comma_list("--models", args.models),
              "strategies": args.strategies and comma_list("--strategies", args.strategies),
              "seeds": args.seeds and seed_list(args.seeds)}  # a mistake in them stops before DVC is asked
    if args.remote:
        remotes.check(args.remote)
        remotes.pull(args.remote, args.all_commits, outputs=False)  # models and arrays stay on the remote
    records = select(experiments.records(experiments.exp_show(args.all_commits)), **chosen)
    if not records:
        raise UserError("no DVC experiments match: run python -m stages.study first")
    write(records)
    print((OUT / "results.md").read_text())


if __name__ == "__main__":
    run_stage(main)
