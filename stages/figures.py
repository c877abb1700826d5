"""Figures a person reads, drawn with matplotlib: the test confusion matrix and predictions.

Learning curves come from DVCLive's files through `dvc plots`; the study's chart is in report.py.
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    """Rows are true classes, columns predictions; each row normalised to sum to 1."""
    share = matrix / matrix.sum(1, keepdims=True).clip(min=1)
    size = max(6, 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    if len(classes) <= 20:
        for (i, j), value in np.ndenumerate(share):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(image, ax=ax, label="share of the true class")
    save(fig, path)


def prediction_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, classes: list[str],
                    title: str, path: Path, columns: int = 8) -> None:
    """Test images with their predicted and true labels; mistakes in red."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, truth, guess in zip(axes.flat, images, labels, predicted):
        ax.imshow(image, interpolation="nearest")
        right = truth == guess
        ax.set_title(f"{classes[guess]}" + ("" if right else f"\n(true: {classes[truth]})"),
                     fontsize=8, color="black" if right else "red")
    fig.suptitle(f"{title}\nlabel = prediction; red = mistake, with the true class")
    save(fig, path)


def save(fig, path: Path) -> None:
    """The figure as a PNG at `path`, then closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
