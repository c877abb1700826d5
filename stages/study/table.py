"""The study's results table, with pandas: one row per set of params but the seed.

runs() turns the experiments' records (experiments.py) into a DataFrame, one row per experiment:
its state, its params in columns named as in params.yaml (data.image_size), and its measures,
each read from the metrics file of the stage that measured it. results() groups those rows by
every param but the seed, with the mean and std of test accuracy over the seeds that succeeded.
A published number stands beside a row only where it compares like for like.
"""
import pandas as pd

from stages.pipeline import outputs
from stages.study.experiments import NOT_RUN, flat, nest, state_order
from stages.study.protocols import PUBLISHED_PROTOCOL, differences, nearest, overrides, protocol_of, strategy_of

# The study's test accuracy, from its notebook's protocol (stages/study/protocols.yaml: SGD with
# momentum 0.9, batch 32, 3 epochs) on the whole of CIFAR-10 at 224 px with ImageNet weights.
PUBLISHED = {("alexnet", "feature_extraction"): 0.8132, ("alexnet", "finetune"): 0.8917,
             ("vgg16", "feature_extraction"): 0.8196, ("vgg16", "finetune"): 0.9223}
TRAINING = "training"  # stands for the metrics file of the run's training stage, by its strategy
MEASURES = {  # column: (metrics file, key in it)
    "test_accuracy": (outputs.METRICS, "test.accuracy"),
    "total_time_s": (outputs.METRICS, "total_time_s"),  # the whole cost: the parts below (lp_ft: and its probe)
    "features_time_s": (outputs.FEATURE_METRICS, "time_s"),
    "train_time_s": (TRAINING, "time_s"),
    "evaluate_time_s": (outputs.METRICS, "evaluate_time_s"),
    "train_images_per_s": (TRAINING, "images_per_s"),
    "trainable_params": (TRAINING, "trainable_params"),
    "ran_on": (outputs.METRICS, "run.device"),
}
NUMBERS = [column for column in MEASURES if column != "ran_on"]
COLUMNS = ["model", "strategy", "protocol", "settings", "published_accuracy", "published_note", "seeds", "runs_ok",
           "accuracy_mean", "accuracy_std", "total_time_s", "features_time_s", "train_time_s", "evaluate_time_s",
           "train_images_per_s",
           "trainable_params", "problems", "failed"]  # results()'s, besides the swept params: an empty table's too


def runs(records: list[dict]) -> pd.DataFrame:
    """One row per experiment: name, state, error, a column per param, a column per figure."""
    rows = [{"name": r["name"], "state": r["state"], "error": r["error"], **flat(r["params"]), **measures(r)}
            for r in records]
    # object: a param keeps its value (500 stays an int beside a null, a null stays None)
    table = pd.DataFrame(rows, columns=None if rows else ["name", "state", "error", *MEASURES], dtype=object)
    return table.astype(dict.fromkeys(NUMBERS, float))


def measures(record: dict) -> dict:
    """The record's measures, each from its stage's metrics file (None where it has none)."""
    live = outputs.LIVE.get(record["params"].get("strategy"))
    training = str(live / "metrics.json") if live else None
    files = {path: flat(content) for path, content in record["metrics"].items()}
    return {column: files.get(training if path == TRAINING else str(path), {}).get(key)
            for column, (path, key) in MEASURES.items()}


def results(experiments: pd.DataFrame) -> pd.DataFrame:
    """One row per set of params but the seed, mean ± std of test accuracy over the seeds that
    succeeded; a set without a number keeps its row and says why (failed, not run)."""
    if experiments.empty:  # an empty shard: no params to group by, and pandas' grouping needs them
        table = pd.DataFrame(columns=COLUMNS)
        table.attrs["swept"] = []
        return table
    params = [c for c in experiments.columns if c not in ("name", "state", "error", *MEASURES)]
    grouping = [c for c in params if c != "seed"]
    unique = one_per_run(experiments, params).assign(key=lambda t: t[grouping].map(text).agg("\n".join, axis=1))
    numbers = unique.groupby("key", sort=False).agg(
        seeds=("seed", lambda seeds: ",".join(map(str, sorted(seeds)))),
        runs_ok=("test_accuracy", "count"), accuracy_mean=("test_accuracy", "mean"),
        accuracy_std=("test_accuracy", "std"),  # pandas' sample std: NaN for one seed
        **{column: (column, "mean") for column in ("total_time_s", "features_time_s", "train_time_s",
                                                   "evaluate_time_s", "train_images_per_s")},
        trainable_params=("trainable_params", "first"),
        problems=("problem", lambda found: "; ".join(found.dropna())), failed=("failed", "sum"))
    settings = unique.drop_duplicates("key").set_index("key")[grouping]
    differing = [c for c in grouping if c not in ("model", "strategy") and settings[c].map(text).nunique() > 1]
    if "weights" in differing and len(set(settings["weights"].map(text)) - {"none"}) == 1:
        differing.remove("weights")  # pre-trained or none: the strategy column says it (scratch)
    described = pd.DataFrame([describe(row.to_dict(), differing) for _, row in settings.iterrows()],
                             index=settings.index)
    # What varies within a strategy (not a scratch recipe's rates against fine-tuning's): their values too, for curves
    strategies = settings.apply(lambda row: strategy_of(row.to_dict()), axis=1)
    swept = [c for c in differing if settings[c].map(text).groupby(strategies).nunique().max() > 1]
    table = described.join(settings[swept]).join(numbers).sort_values(
        ["model", "strategy", "protocol", *swept, "settings"], ignore_index=True, key=_sortable)
    table.attrs["swept"] = swept
    return table


def curve_key(results: pd.DataFrame) -> str | None:
    """The swept param to draw accuracy against: the training-set size if it varies, else the first
    numeric one (null stands for all of the data), else None."""
    numeric = [c for c in results.attrs.get("swept", [])
               if results[c].map(lambda v: v is None or _is_number(v)).all() and results[c].map(_is_number).any()]
    return "data.train_per_class" if "data.train_per_class" in numeric else next(iter(numeric), None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not pd.isna(value)


def _sortable(column: pd.Series) -> pd.Series:
    """Numbers in order with null (all of the data) after them; anything else as text."""
    if column.map(lambda v: v is None or _is_number(v)).all():
        return column.map(lambda v: float(v) if _is_number(v) else float("inf"))
    return column.map(text)


def gains_over_scratch(results: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per value of `key`, each strategy's test accuracy, its gain in points over training from scratch
    (the scratch row of the same model, protocol and other settings) and its whole cost."""
    others = [c for c in results.attrs.get("swept", []) if c != key]
    done = results[results["accuracy_mean"].notna()].sort_values(key, key=_sortable, kind="stable")
    match = ["model", "protocol", key, *others]

    def cell(row) -> tuple:
        return tuple(text(row[c]) for c in match)

    scratch = {cell(row): row["accuracy_mean"] for _, row in done.iterrows() if row["strategy"] == "scratch"}
    return pd.DataFrame([{key: "all" if row[key] is None else text(row[key]), "model": row["model"],
                          "strategy": row["strategy"], **{c: text(row[c]) for c in others}, "seeds": row["seeds"],
                          "test_accuracy": row["accuracy_mean"],
                          "gain_over_scratch": 100 * (row["accuracy_mean"] - scratch.get(cell(row), float("nan"))),
                          "time_s": row["total_time_s"]} for _, row in done.iterrows()],
                        columns=[key, "model", "strategy", *others, "seeds", "test_accuracy", "gain_over_scratch",
                                 "time_s"])  # named, for when no run succeeded


def one_per_run(experiments: pd.DataFrame, params: list[str]) -> pd.DataFrame:
    """One row per set of params, seed included, the best state first: a repeated run neither counts
    twice nor hides a success. Figures only where the run succeeded; `problem` and `failed` say why not."""
    unique = experiments.assign(rank=experiments["state"].map(state_order)).sort_values("rank", kind="stable").drop_duplicates(params)
    done = (unique["state"] == "success") & unique["test_accuracy"].notna()
    return unique.assign(
        **{column: unique[column].where(done) for column in NUMBERS},
        problem=[None if ok else f"{name}: {why(error)}"
                 for name, error, ok in zip(unique["name"], unique["error"], done)],
        failed=[not ok and not why(error).startswith(NOT_RUN) for error, ok in zip(unique["error"], done)])


def describe(params: dict, differing: list[str]) -> dict:
    """A row's model, strategy, protocol, the settings that tell it from the other rows, and the published number."""
    params = {k: v for k, v in params.items() if not (isinstance(v, float) and pd.isna(v))}  # NaN: a key it lacks
    nested = nest(params)
    protocol = protocol_of(nested)
    base = protocol or nearest(nested)
    # The protocol's name stands for its keys; a custom row names those that differ from the nearest one
    implied = set(overrides(base, scratch=strategy_of(params) == "scratch")) - set(differences(nested, base))
    number, note = published(params, protocol)
    return {"model": params.get("model"), "strategy": strategy_of(params),
            "protocol": protocol or f"custom (near {base})",
            "settings": ", ".join(f"{k}={text(params.get(k))}" for k in differing if k not in implied),
            "published_accuracy": float("nan") if number is None else number, "published_note": note}


def published(params: dict, protocol: str | None) -> tuple[float | None, str]:
    """The published accuracy to set beside a run of these (flat) params under `protocol` (None:
    custom), or why none compares."""
    key = (params.get("model"), params.get("strategy"))
    if key not in PUBLISHED:
        return None, "not in the study"
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


def why(error: str | None) -> str:
    return error or f"no test accuracy in {outputs.METRICS}"


def text(value) -> str:
    """A param's value as params.yaml writes it."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def provenance(experiments: pd.DataFrame) -> str:
    """Where the numbers come from: data source, weights, image size and device of each run."""
    ran = experiments[experiments["ran_on"].notna()].reindex(
        columns=["data.source", "data.root", "weights", "data.image_size", "ran_on"])
    seen = sorted({tuple(text(v) for v in row) for row in ran.itertuples(index=False)})
    return "\n".join(f"- data: {s} ({root}), weights: {w}, image size: {size} px, device: {d}"
                     for s, root, w, size, d in seen)
