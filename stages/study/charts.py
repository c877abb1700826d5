"""The study's charts, drawn from its results table (table.py): a bar per row, accuracy against cost,
and accuracy against a swept param (the transfer curve)."""
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STRATEGY_SHORT = {"feature_extraction": "feature extraction", "finetune": "fine-tuning",
                  "lp_ft": "probe, then fine-tune", "scratch": "from scratch"}
MARKERS = {"feature_extraction": "o", "finetune": "s", "lp_ft": "^", "scratch": "D"}


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
    for row in shown.itertuples():
        ax.errorbar(row.total_time_s, row.accuracy_mean, yerr=0 if pd.isna(row.accuracy_std) else row.accuracy_std,
                    fmt=MARKERS.get(row.strategy, "D"), color=colours[row.protocol], markersize=8, capsize=3)
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
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS.get(s, "D"), linestyle="",
                           label=STRATEGY_SHORT.get(s, s)) for s in dict.fromkeys(shown["strategy"])]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.set(xlabel="whole cost of a run (s): feature cache + training", ylabel="test accuracy",
           title="What each protocol buys: test accuracy against cost")
    ax.grid(alpha=0.3)
    return fig


# Published points of the same question, each drawn with its own setting (the README gives the sources):
# (label, examples per class, test accuracy); "all" is the dataset's whole training split.
ANCHORS = [
    ("BiT-M R50x1 fine-tuned, CIFAR-10, 128 px (BiT, median of 5)", [(1, 0.544), (5, 0.833), (5000, 0.972)], "*"),
    ("WRN-28-2 from scratch, CIFAR-10, 32 px (USB, labelled only)", [(4, 0.224), (25, 0.440), (400, 0.845),
                                                                      (5000, 0.954)], "X"),
    ("ResNet-50 fine-tuned, CIFAR-100, 224 px (VTAB)", [(10, 0.570), (500, 0.838)], "^"),
    ("ResNet-50 from scratch, CIFAR-100, 224 px (VTAB)", [(10, 0.132), (500, 0.644)], "v"),
]
SIZE_KEY = "data.train_per_class"


def transfer_curve(table: pd.DataFrame, key: str) -> plt.Figure:
    """Test accuracy against a swept param: a line per model × strategy (× protocol and the other swept
    settings), the mean over seeds with a ±std band. Against the training-set size the x axis is
    logarithmic, null (every image) sits at the right as "all", and the published anchors are marked."""
    shown = table[table["accuracy_mean"].notna()]
    numbers = [v for v in shown[key] if v is not None and not pd.isna(v)]
    log = key == SIZE_KEY or (numbers and min(numbers) > 0 and max(numbers) >= 10 * min(numbers))
    everything = (max(numbers) if numbers else 1) * (4 if log else 1.3)  # where null (all of the data) is drawn
    fig, ax = plt.subplots(figsize=(10, 5.5))
    others = [c for c in table.attrs.get("swept", []) if c != key]
    lines = shown.groupby(["model", "strategy", "protocol", *others], sort=False, dropna=False)
    for i, (group, rows) in enumerate(lines):
        x = np.array([everything if v is None or pd.isna(v) else float(v) for v in rows[key]])
        order = np.argsort(x)
        mean = rows["accuracy_mean"].to_numpy(float)[order]
        std = rows["accuracy_std"].fillna(0).to_numpy(float)[order]
        model, strategy, protocol, *rest = group
        label = ", ".join([model.removeprefix("timm/"), STRATEGY_SHORT.get(strategy, strategy), protocol,
                           *(f"{c}={v}" for c, v in zip(others, rest))])
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot(x[order], mean, marker=MARKERS.get(strategy, "D"), color=colour, label=label)
        ax.fill_between(x[order], mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
    if key == SIZE_KEY:
        for label, points, marker in ANCHORS:
            ax.scatter(*zip(*points), marker=marker, s=70, color="dimgrey", zorder=3, label=f"published: {label}")
    if log:
        ax.set_xscale("log")
    ticks = sorted({*numbers, *([everything] if len(numbers) < len(shown) else []),
                    *((1, 10, 100, 1000, 5000) if key == SIZE_KEY else ())})  # the anchors' sizes too
    if ticks:
        ax.set_xticks(ticks, ["all" if t == everything and len(numbers) < len(shown) else f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="training images per class" if key == SIZE_KEY else key, ylabel="test accuracy", ylim=(0, 1),
           title=f"Test accuracy against {'training images per class' if key == SIZE_KEY else key}, mean ± std "
                 "over seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize=8)
    return fig
