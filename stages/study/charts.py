"""The study's charts, drawn from its results table (table.py): a bar per row, and accuracy against cost."""
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

STRATEGY_SHORT = {"feature_extraction": "feature extraction", "finetune": "fine-tuning"}


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
