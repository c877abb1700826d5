"""Figures a person reads, drawn with matplotlib: the test confusion matrix and predictions.

Learning curves come from DVCLive's files through `dvc plots`; the study's charts are in stages/study/charts.py.
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
    """Test images with their predicted and true labels; mistakes in red. The images are tiled
    into one picture on one axes: a subplot per image costs matplotlib a second per figure."""
    rows = -(-len(images) // columns)
    side = max(images.shape[1], images.shape[2])
    gap = max(2, side // 8)
    tile_w, tile_h = side + gap, side + 3 * gap  # room under each image for two lines of label
    tiled = np.full((rows * tile_h, columns * tile_w, 3), 255, dtype=np.uint8)
    fig, ax = plt.subplots(figsize=(1.6 * columns, 2.0 * rows))
    for i, (image, truth, guess) in enumerate(zip(images, labels, predicted)):
        top, left = (i // columns) * tile_h, (i % columns) * tile_w
        tiled[top:top + image.shape[0], left:left + image.shape[1]] = image
        right = truth == guess
        ax.text(left + side / 2, top + side + gap / 2, classes[guess] + ("" if right else f"\n(true: {classes[truth]})"),
                ha="center", va="top", fontsize=7, color="black" if right else "red")
    ax.imshow(tiled, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(f"{title}\nlabel = prediction; red = mistake, with the true class")
    save(fig, path)


def save(fig, path: Path) -> None:
    """The figure as a PNG at `path`, then closed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the whole drawing, a legend beside the axes included
    plt.close(fig)
