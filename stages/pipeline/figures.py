"""Figures a person reads: the test confusion matrix and predictions, drawn with PIL.

Not matplotlib: evaluate draws both in every cell of a study, and matplotlib's import and two
figures cost 1.1 s a cell on a 2-core CPU, PIL's 0.05 s (README "Speed"). Learning curves come
from DVCLive's files through `dvc plots`; the study's charts are drawn with matplotlib in
stages/study/charts.py and saved by save() here.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 13
LOW, HIGH = np.array([247, 251, 255]), np.array([8, 48, 107])  # matplotlib's "Blues" at 0 and 1
RED, BLACK, WHITE = (200, 0, 0), (0, 0, 0), (255, 255, 255)


def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def blues(share: np.ndarray) -> np.ndarray:
    """uint8 RGB for shares in [0, 1]: white to dark blue."""
    return (LOW + (HIGH - LOW) * share[..., None]).round().astype(np.uint8)


def text_width(text: str, face) -> int:
    return int(np.ceil(face.getlength(text)))


def confusion(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    """Rows are true classes, columns predictions; each row normalised to sum to 1, its share written in
    each cell (up to 20 classes), and a colour bar."""
    share = matrix / matrix.sum(1, keepdims=True).clip(min=1)
    n, face = len(classes), font()
    cell = 40 if n <= 20 else max(8, 800 // n)
    names = max(text_width(c, face) for c in classes)
    left, top = names + 2 * FONT_SIZE + 12, 2 * FONT_SIZE + 12
    side = n * cell
    bar_left = left + side + 16
    canvas = Image.new("RGB", (bar_left + 80, top + side + names + 2 * FONT_SIZE + 16), WHITE)
    tiles = np.kron(blues(share), np.ones((cell, cell, 1), dtype=np.uint8))
    canvas.paste(Image.fromarray(tiles), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 4), title, fill=BLACK, font=face)
    draw.rectangle((left - 1, top - 1, left + side, top + side), outline=BLACK)
    for i, name in enumerate(classes):
        middle = top + i * cell + cell // 2
        draw.text((left - 6, middle), name, fill=BLACK, font=face, anchor="rm")  # a row: the true class
        label = Image.new("RGB", (text_width(name, face) + 2, FONT_SIZE + 4), WHITE)
        ImageDraw.Draw(label).text((0, 0), name, fill=BLACK, font=face)
        canvas.paste(label.rotate(90, expand=True), (left + i * cell + (cell - FONT_SIZE) // 2, top + side + 6))
    if n <= 20:
        for (i, j), value in np.ndenumerate(share):
            draw.text((left + j * cell + cell // 2, top + i * cell + cell // 2), f"{value:.2f}", anchor="mm",
                      font=font(11), fill=WHITE if value > 0.5 else BLACK)
    draw.text((left + side // 2, top + side + names + 12), "predicted class", fill=BLACK, font=face, anchor="mt")
    axis = Image.new("RGB", (text_width("true class", face) + 2, FONT_SIZE + 4), WHITE)
    ImageDraw.Draw(axis).text((0, 0), "true class", fill=BLACK, font=face)
    canvas.paste(axis.rotate(90, expand=True), (4, top + side // 2 - axis.width // 2))
    gradient = blues(np.linspace(1, 0, side))[:, None, :].repeat(14, axis=1)
    canvas.paste(Image.fromarray(gradient), (bar_left, top))
    draw.rectangle((bar_left - 1, top - 1, bar_left + 14, top + side), outline=BLACK)
    for value, y in ((1, top), (0.5, top + side // 2), (0, top + side)):
        draw.text((bar_left + 20, y), f"{value:g}", fill=BLACK, font=face, anchor="lm")
    draw.text((bar_left, top + side + 6), "share of the\ntrue class", fill=BLACK, font=font(11))
    write(canvas, path)


def prediction_grid(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray, classes: list[str],
                    title: str, path: Path, columns: int = 8) -> None:
    """Test images with their predicted and true labels; mistakes in red."""
    face = font(11)
    scale = max(1, 96 // max(images.shape[1], images.shape[2]))  # CIFAR's 32 px shown at 96
    side = max(images.shape[1], images.shape[2]) * scale
    tile_w = max(side, max(text_width(f"(true: {c})", face) for c in classes)) + 8
    tile_h = side + 32  # room under each image for two lines of label
    rows = -(-len(images) // columns)
    top = 2 * FONT_SIZE + 14
    canvas = Image.new("RGB", (columns * tile_w, top + rows * tile_h), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"{title}\nlabel = prediction; red = mistake, with the true class", fill=BLACK, font=font())
    for i, (image, truth, guess) in enumerate(zip(images, labels, predicted)):
        x, y = (i % columns) * tile_w + (tile_w - side) // 2, top + (i // columns) * tile_h
        shown = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
        canvas.paste(shown, (x, y))
        right = truth == guess
        text = classes[guess] + ("" if right else f"\n(true: {classes[truth]})")
        draw.multiline_text((x + side // 2, y + side + 3), text, fill=BLACK if right else RED, font=face,
                            anchor="ma", align="center")
    write(canvas, path)


def write(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def save(fig, path: Path) -> None:
    """A matplotlib figure (the study's charts) as a PNG at `path`, then closed."""
    import matplotlib.pyplot as plt  # here alone: evaluate's figures above need no matplotlib
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the whole drawing, a legend beside the axes included
    plt.close(fig)
