"""The prepared arrays that prepare-data writes and every later stage reads, and the seeded
draws of the training subset.

One uint8 N×S×S×3 array and one int64 label array per split, as .npy, with a manifest. The
images are written one at a time (sources.ImageFile, prepare-data's alone) and read back a batch
at a time (open_split, then read_rows), so that no stage's memory grows with the data.
"""
import json
import math
import mmap
from pathlib import Path

import numpy as np

from stages.pipeline.errors import UserError

SPLITS = ("train", "val", "test")


class DataError(UserError):
    pass


def rng(seed: int, purpose: str) -> np.random.Generator:
    """A generator per purpose, so that adding one use of randomness never shifts another."""
    return np.random.default_rng([seed, *purpose.encode()])


def train_subset(labels: np.ndarray, per_class: int | None, seed: int, classes: list[str]) -> np.ndarray:
    """Sorted indices of `per_class` training images of each class (None: all of them). Each class
    is shuffled by its own generator seeded by `seed`, and the subset is the head of that order,
    so for one seed the smaller subsets lie inside the larger ones, and seeds average over subsets."""
    if per_class is None:
        return np.arange(len(labels))
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise DataError(f"data.train_per_class is {per_class}, but class {classes[c]} has only {len(members)} training "
                            "images after the validation carve: lower data.train_per_class (or data.val_fraction)")
        chosen.append(rng(seed, f"train_subset/{c}").permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


# --- reading the prepared arrays ---------------------------------------------------------------

def open_split(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images memory-mapped (copy-on-write, so that torch takes them as they are; nothing
    is read until used: streaming.split_inputs reads them a batch at a time) and its labels."""
    return np.load(folder / f"{name}_images.npy", mmap_mode="c"), np.load(folder / f"{name}_labels.npy")


def open_train_subset(folder: Path, per_class: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """open_split's train images and labels, or the `per_class` of each class that train_subset draws."""
    images, labels = open_split(folder, "train")
    if per_class is None:
        return images, labels
    subset = train_subset(labels, per_class, seed, load_manifest(folder)["classes"])
    return images[subset], labels[subset]


def read_rows(images: np.ndarray, start: int, out: np.ndarray) -> np.ndarray:
    """Rows start, start + 1, ... of `images` in `out`, as many as fit or remain. A memory-mapped
    array is read from its file: so its pages stay in the page cache, and out of this process's
    memory, where reading through the mapping would keep every page it touched."""
    rows = min(len(out), len(images) - start)
    if not isinstance(images, np.memmap) or not isinstance(images.base, mmap.mmap):  # a view's offset is its file's
        out[:rows] = images[start:start + rows]
        return out[:rows]
    row_bytes = images.itemsize * math.prod(images.shape[1:])
    with open(images.filename, "rb", buffering=0) as file:
        file.seek(images.offset + start * row_bytes)
        file.readinto(memoryview(out[:rows]).cast("B"))
    return out[:rows]


def load_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def num_classes(folder: Path) -> int:
    return len(load_manifest(folder)["classes"])
