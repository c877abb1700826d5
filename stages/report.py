"""The study's results table and bar chart, read back from DVC's experiments.

    python -m stages.report                              # every experiment of the commit checked out
    python -m stages.report --models alexnet --seeds 0,1 # only those
    python -m stages.report --all-commits                # also those made at earlier commits
    python -m stages.report --remote origin              # first pulls the experiments other machines pushed

Reads `dvc exp show --json` only: each experiment's state (queued, running, failed or success),
its params.yaml and metrics/metrics.json as DVC committed them, and for a failure the last error
line of the log that DVC names. One row per set of params but the seed, so that runs made under
different settings never average together; a column names the settings that differ between the
rows. Writes study/results.{md,csv}, study/accuracy.png (a bar per row) and study/cost_accuracy.png
(test accuracy against each row's whole cost).
"""
import argparse
import json
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stages.errors import UserError, run_stage  # noqa: E402
from stages.protocols import PROTOCOLS, PUBLISHED_PROTOCOL, differences, nearest, protocol_of  # noqa: E402

OUT = Path("study")
METRICS = "metrics/metrics.json"
# The study's test accuracy, from its notebook's protocol (stages/protocols.yaml: SGD with momentum
# 0.9, batch 32, 3 epochs) on the whole of CIFAR-10 at 224 px with ImageNet weights.
PUBLISHED = {("alexnet", "feature_extraction"): 0.8132, ("alexnet", "finetune"): 0.8917,
             ("vgg16", "feature_extraction"): 0.8196, ("vgg16", "finetune"): 0.9223}
# A state is worth waiting for, done, or neither; success first when several runs share params.
PREFERENCE = ("success", "running", "queued", "failed")
EXP_SHOW_TIMEOUT_S = 60  # it takes seconds, a few tens under load
EXP_SHOW_TRIES = 3  # hangs in a row before giving up
EXP_SHOW_FAILING_S = 60  # a failing read (a queue worker removing its folder meanwhile) is asked again this long
STRATEGY_SHORT = {"feature_extraction": "feature extraction", "finetune": "fine-tuning"}
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
            last = (err.read().strip().splitlines() or ["no output"])[-1]
            raise DvcFailed(f"error: `dvc {' '.join(args)}` failed with exit code {code}: {last}")
        return out.read(), err.read()


def exp_show(all_commits: bool = False) -> list[dict]:
    """`dvc exp show --json`, asked again when it hangs (reading an experiment that finishes
    meanwhile can block it for good: pygit2's blob reader waits on a thread that has died) or
    fails (observed: "failed to show experiments - directory '.dvc/tmp/exps/...'" while a queue
    worker cleaned up), after 1, 2, 4, ... s, until it has failed for EXP_SHOW_FAILING_S."""
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
            if failing_s >= EXP_SHOW_FAILING_S:
                raise SystemExit(f"{failure} (still, after {failing_s:.0f} s of asking again)") from None
            time.sleep(wait)
            failing_s, wait = failing_s + wait, min(2 * wait, 15.0)


def workspace_params(shown: list[dict]) -> dict:
    """params.yaml in the workspace, which DVC stashes as the start of every queued experiment."""
    workspace = next(rev for rev in shown if rev["rev"] == "workspace")
    return _file_data((workspace.get("data") or {}).get("params"), "params.yaml")


def experiments(shown: list[dict]) -> list[dict]:
    """One record per experiment: name, state, params (nested), metrics (nested), error, log."""
    return [_record(experiment) for baseline in shown for experiment in baseline.get("experiments") or []]


def _record(experiment: dict) -> dict:
    head = experiment["revs"][0]  # the experiment's last commit
    data = head.get("data") or {}
    # DVC 3 keeps the state in the queue's executor; an experiment run outside the queue, or one
    # whose queue entry `dvc queue remove --success` cleared, has none: only successes have commits
    executor = experiment.get("executor") or {"state": "failed" if head.get("error") else "success"}
    log = (executor.get("local") or {}).get("log")
    return {"name": experiment.get("name") or head.get("name") or head["rev"][:7], "state": executor["state"],
            "params": _file_data(data.get("params"), "params.yaml"), "metrics": _file_data(data.get("metrics"), METRICS),
            "error": _error(executor["state"], log, None if experiment.get("executor") else head.get("error")),
            "log": log, "pid": (executor.get("local") or {}).get("pid")}


def _file_data(files: dict | None, path: str) -> dict:
    return ((files or {}).get(path) or {}).get("data") or {}


def _error(state: str, log: str | None, unreadable: dict | None) -> str | None:
    """Why an experiment has no result; `unreadable`: DVC's error for a commit it could not read."""
    if state == "success":
        return None
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


def nest(dotted: dict) -> dict:
    out = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        section = out
        for name in parents:
            section = section.setdefault(name, {})
        section[last] = value
    return out


def best(records: list[dict]) -> dict:
    """Of runs with the same params: a success, else one still to come, else the latest failure."""
    return min(records, key=lambda r: PREFERENCE.index(r["state"]) if r["state"] in PREFERENCE else len(PREFERENCE))


def one_per_run(records: list[dict]) -> list[dict]:
    """One record per set of params, seed included: a repeated run neither counts twice nor hides a success."""
    runs = defaultdict(list)
    for r in records:
        runs[_key(flat(r["params"]))].append(r)
    return [best(same) for same in runs.values()]


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def published(params: dict) -> tuple[float | None, str]:
    """The published accuracy to set beside a run of these (flat) params, or why none compares."""
    key = (params.get("model"), params.get("strategy"))
    if key not in PUBLISHED:
        return None, "not in the study"
    protocol = protocol_of(nest(params))
    reasons = [] if protocol == PUBLISHED_PROTOCOL else [f"protocol differs ({protocol or 'custom'})"]
    if params.get("data.source") != "cifar10":
        reasons.append(f"data differs ({params.get('data.source')})")
    elif params.get("data.limit_per_class") is not None:
        reasons.append(f"data differs (subset: limit_per_class {params['data.limit_per_class']})")
    if params.get("weights") != "imagenet":
        reasons.append(f"weights differ ({params.get('weights')})")
    if params.get("data.image_size") != 224:
        reasons.append(f"image size differs ({params.get('data.image_size')} px)")
    return (None, "; ".join(reasons)) if reasons else (PUBLISHED[key], "")


def results_table(records: list[dict]) -> pd.DataFrame:
    """One row per set of params but the seed, mean ± std of test accuracy over the seeds that
    succeeded; a run without a number keeps its row and says why (failed, not run)."""
    records = one_per_run(records)
    groups = defaultdict(list)
    for r in records:
        params = flat(r["params"])
        groups[_key({k: v for k, v in params.items() if k != "seed"})].append(r)
    differing = _differing([dict(key) for key in groups])
    rows = [_row(dict(key), runs, differing) for key, runs in groups.items()]
    return pd.DataFrame(rows).sort_values(["model", "strategy", "protocol", "settings"], ignore_index=True)


def _differing(groups: list[dict]) -> list[str]:
    """The params whose value differs between groups, other than model and strategy (own columns)."""
    keys = sorted(set().union(*groups)) if groups else []
    return [k for k in keys if k not in ("model", "strategy") and len({g.get(k) for g in groups}) > 1]


def _row(params: dict, runs: list[dict], differing: list[str]) -> dict:
    protocol = protocol_of(nest(params))
    base = protocol or nearest(nest(params))
    # The protocol's name stands for its keys; a custom row names those that differ from the nearest one
    implied = set(PROTOCOLS[base]) - set(differences(nest(params), base))
    done = [r for r in runs if r["state"] == "success" and _metric(r, "test.accuracy") is not None]
    accuracies = [_metric(r, "test.accuracy") for r in done]
    number, note = published(params)
    return {"model": params.get("model"), "strategy": params.get("strategy"),
            "protocol": protocol or f"custom (near {base})",
            "settings": ", ".join(f"{k}={_text(params.get(k))}" for k in differing if k not in implied),
            "seeds": ",".join(str(s) for s in sorted(r["params"].get("seed") for r in runs)),
            "runs_ok": len(done),
            "accuracy_mean": np.mean(accuracies) if accuracies else np.nan,
            "accuracy_std": np.std(accuracies, ddof=1) if len(accuracies) > 1 else np.nan,
            "published_accuracy": np.nan if number is None else number, "published_note": note,
            **{column: _mean(done, dotted) for column, dotted in (
                ("total_time_s", "total_time_s"), ("features_time_s", "features.time_s"),
                ("train_time_s", "train.time_s"), ("train_images_per_s", "train.images_per_s"),
                ("test_images_per_s", "test.images_per_s"))},
            "trainable_params": next((_metric(r, "train.trainable_params") for r in done), np.nan),
            "problems": "; ".join(f"{r['name']}: {_why(r)}" for r in runs if r not in done),
            "failed": sum(r not in done and not _why(r).startswith(NOT_RUN) for r in runs)}


def _why(record: dict) -> str:
    return record["error"] or "no test accuracy in metrics/metrics.json"


def _metric(record: dict, dotted: str):
    return flat(record["metrics"]).get(dotted)


def _mean(records: list[dict], dotted: str) -> float:
    values = [v for v in (_metric(r, dotted) for r in records) if v is not None]
    return float(np.mean(values)) if values else np.nan


def _text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def provenance(records: list[dict]) -> str:
    """Where the numbers come from: data source, weights, image size and device of each run."""
    seen = sorted({(str(flat(r["params"]).get("data.source")), str(flat(r["params"]).get("data.root")),
                    str(r["params"].get("weights")), str(flat(r["params"]).get("data.image_size")),
                    str(_metric(r, "run.device"))) for r in records if r["metrics"]})
    return "\n".join(f"- data: {s} ({root}), weights: {w}, image size: {size} px, device: {d}"
                     for s, root, w, size, d in seen)


def write_report(table: pd.DataFrame, records: list[dict], folder: Path = OUT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "results.csv", index=False)
    shown = table.assign(
        accuracy=[_mean_std(m, s, n, f) for m, s, n, f in
                  zip(table["accuracy_mean"], table["accuracy_std"], table["runs_ok"], table["failed"])],
        published=[note or f"{a:.4f}" for a, note in zip(table["published_accuracy"], table["published_note"])],
        time_s=[_time(t, f, tr) for t, f, tr in zip(table["total_time_s"], table["features_time_s"], table["train_time_s"])],
        train_images_per_s=table["train_images_per_s"].round(0),
        test_images_per_s=table["test_images_per_s"].round(0),
        trainable_params=table["trainable_params"].map(lambda n: "" if pd.isna(n) else f"{int(n):,}"))
    columns = ["model", "strategy", "protocol", "settings", "seeds", "accuracy", "published", "time_s",
               "train_images_per_s", "test_images_per_s", "trainable_params", "problems"]
    if not table["settings"].any():
        columns.remove("settings")
    shown = shown[columns].astype(object).where(shown[columns].notna(), "")
    markdown = shown.to_markdown(index=False)  # pandas uses tabulate, which dvc installs
    (folder / "results.md").write_text(
        "# Study results\n\nTest accuracy as mean ± std over seeds, one row per set of params but the seed. "
        "published: the study's number, where the row ran its notebook's protocol on the same data, weights "
        "and image size, else why it does not compare. time_s: the whole cost of a run, feature cache "
        "+ training.\n\n"
        f"{markdown}\n\n## Provenance\n{provenance(records)}\n")
    _save(study_bars(table), folder / "accuracy.png")
    _save(cost_accuracy(table), folder / "cost_accuracy.png")


def _mean_std(mean, std, count, failed) -> str:
    if pd.isna(mean):
        return "failed" if failed else "not run"
    return f"{mean:.4f}" if count < 2 else f"{mean:.4f} ± {std:.4f}"


def _time(total, features, train) -> str:
    if pd.isna(total):
        return ""
    return f"{total:.1f}" if pd.isna(features) or pd.isna(train) else f"{total:.1f} ({features:.1f} + {train:.1f})"


def study_bars(table: pd.DataFrame) -> plt.Figure:
    """Test accuracy per row of the table, with the std over seeds and the published numbers."""
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(table)), 4.8))
    x = np.arange(len(table))
    ax.bar(x, table["accuracy_mean"], yerr=table["accuracy_std"].fillna(0), capsize=4, label="this run")
    comparable = table["published_accuracy"].notna().to_numpy()
    if comparable.any():
        ax.scatter(x[comparable], table["published_accuracy"][comparable], marker="_", s=900, color="black",
                   zorder=3, label="published study")
    for i in np.flatnonzero(table["accuracy_mean"].isna().to_numpy()):
        ax.text(x[i], 0.02, "failed" if table["failed"].iloc[i] else "not run", color="red", ha="center")
    ax.set_xticks(x, [f"{m}\n{s}\n{p}" + (f"\n{st}" if st else "") for m, s, p, st in
                      zip(table["model"], table["strategy"], table["protocol"], table["settings"])], fontsize=8)
    ax.set(ylabel="test accuracy", ylim=(0, 1), title="Test accuracy by model, strategy and settings")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside the bars, never on them
    return fig


def cost_accuracy(table: pd.DataFrame) -> plt.Figure:
    """Test accuracy against each row's whole cost (feature cache + training), one labelled point
    per row: colour for the protocol, marker for the strategy, bars for the std over seeds."""
    shown = table[table["accuracy_mean"].notna() & table["total_time_s"].notna()]
    fig, ax = plt.subplots(figsize=(8.5, 5))
    protocols = list(dict.fromkeys(shown["protocol"]))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(protocols)}
    markers = {"feature_extraction": "o", "finetune": "s"}
    for row in shown.itertuples():
        ax.errorbar(row.total_time_s, row.accuracy_mean, yerr=0 if pd.isna(row.accuracy_std) else row.accuracy_std,
                    fmt=markers.get(row.strategy, "D"), color=colours[row.protocol], markersize=8, capsize=3)
        ax.annotate(f"{row.model.removeprefix('timm/')}, {STRATEGY_SHORT.get(row.strategy, row.strategy)}, "
                    f"{row.protocol}", (row.total_time_s, row.accuracy_mean), xytext=(7, -3),
                    textcoords="offset points", fontsize=7)
    ax.margins(y=0.1)
    if len(shown):
        longest = shown["total_time_s"].max()  # the axis runs on past it, for its label
        if longest > 50 * shown["total_time_s"].min():
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlim(shown["total_time_s"].min() / 1.5, longest * 5)
        else:
            ax.set_xlim(0, longest * 1.6)
    handles = [plt.Line2D([], [], color=colours[p], marker="o", linestyle="", label=p) for p in protocols]
    handles += [plt.Line2D([], [], color="grey", marker=markers.get(s, "D"), linestyle="",
                           label=STRATEGY_SHORT.get(s, s)) for s in dict.fromkeys(shown["strategy"])]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.set(xlabel="whole cost of a run (s): feature cache + training", ylabel="test accuracy",
           title="What each protocol buys: test accuracy against cost")
    ax.grid(alpha=0.3)
    return fig


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comma_list(option: str, text: str) -> list[str]:
    """A comma-separated list with no empty or repeated item."""
    items = [item.strip() for item in text.split(",")]
    if not all(items) or len(set(items)) != len(items):
        raise UserError(f"{option} {text!r}: must be a comma-separated list with no empty or repeated item")
    return items


def seed_list(text: str) -> list[int]:
    """--seeds: integers >= 0, comma-separated."""
    seeds = comma_list("--seeds", text)
    if not all(s.isdigit() for s in seeds):
        raise UserError(f"--seeds {text}: must be integers >= 0, comma-separated, e.g. 0,1,2")
    return [int(s) for s in seeds]


def select(records: list[dict], models=None, strategies=None, seeds=None) -> list[dict]:
    """The records of the given models, strategies and seeds (None: all)."""
    return [r for r in records if (not models or r["params"].get("model") in models)
            and (not strategies or r["params"].get("strategy") in strategies)
            and (seeds is None or r["params"].get("seed") in seeds)]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line, exit code 2, no usage."""

    def error(self, message):
        raise UserError(message)


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated; default: all")
    parser.add_argument("--strategies", help="comma-separated; default: all")
    parser.add_argument("--seeds", help="comma-separated; default: all")
    parser.add_argument("--all-commits", action="store_true",
                        help="the experiments of every commit, not only of the one checked out (dvc exp show -A)")
    parser.add_argument("--remote", metavar="GIT_REMOTE",
                        help="pull its experiments (of this commit, or of every one with --all-commits) first")
    args = parser.parse_args()
    if args.remote:
        from stages import remotes  # it imports this module

        remotes.check(args.remote)
        remotes.pull(args.remote, args.all_commits)
    records = select(experiments(exp_show(args.all_commits)),
                     models=args.models and comma_list("--models", args.models),
                     strategies=args.strategies and comma_list("--strategies", args.strategies),
                     seeds=args.seeds and seed_list(args.seeds))
    if not records:
        raise UserError("no DVC experiments match: run python -m stages.study first")
    write_report(results_table(records), records)
    print((OUT / "results.md").read_text())


if __name__ == "__main__":
    run_stage(main)
