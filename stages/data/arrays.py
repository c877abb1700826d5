"""The prepared arrays that prepare-data writes and every later stage reads, and the seeded
draws of the training subset.

One uint8 N×S×S×3 array and one int64 label array per split, as .npy, with a manifest. The
images are written one at a time (ImageFile) and read back a batch at a time (open_split, then
inputs.read_rows), so that no stage's memory grows with the data. Decoding the sources is
sources.py's, prepare-data's alone.
"""
import json
import struct
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


# --- writing and reading the prepared arrays -------------------------------------------------

class ImageFile:
    """A split's uint8 N×S×S×3 .npy file written one image at a time, for at most `capacity` images;
    its header is rewritten with the count at the end, padded to the length it had."""

    def __init__(self, folder: Path, split: str, capacity: int, side: int):
        self.file, self.side, self.count = open(folder / f"{split}_images.npy", "wb"), side, 0
        self.header_length = len(npy_header((capacity, side, side, 3)))
        self.file.write(npy_header((capacity, side, side, 3)))

    def write(self, image: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(image, dtype=np.uint8).data)
        self.count += 1

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(npy_header((self.count, self.side, self.side, 3), self.header_length))
        self.file.close()


def npy_header(shape: tuple, length: int | None = None, dtype=np.uint8) -> bytes:
    """A .npy (version 1.0) header, padded with spaces to `length` bytes, or to a multiple of 64."""
    text = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
    length = length or -(-(len(text) + 11) // 64) * 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length - 10) + (text.ljust(length - 11) + "\n").encode("latin1")


def write_labels(folder: Path, split: str, labels: np.ndarray) -> None:
    np.save(folder / f"{split}_labels.npy", labels)


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def open_split(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images memory-mapped (copy-on-write, so that torch takes them as they are; nothing
    is read until used: inputs.image_inputs reads them a batch at a time) and its labels."""
    return np.load(folder / f"{name}_images.npy", mmap_mode="c"), np.load(folder / f"{name}_labels.npy")


def open_train_subset(folder: Path, per_class: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """open_split's train images and labels, or the `per_class` of each class that train_subset draws."""
    images, labels = open_split(folder, "train")
    if per_class is None:
        return images, labels
    subset = train_subset(labels, per_class, seed, load_manifest(folder)["classes"])
    return images[subset], labels[subset]


def load_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def num_classes(folder: Path) -> int:
    return len(load_manifest(folder)["classes"])
