"""Data sources, the per-class cap, the stratified validation carve, and the prepared arrays.

Every source gives each of its splits as labels plus a loader for chosen indices, so that
`data.limit_per_class` picks images before any file is decoded. What comes out is one uint8
N×H×W×3 array and one int64 label array per split, written as .npy with a manifest.
"""
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stages.errors import UserError
from stages.params import DataParams

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(UserError):
    pass


@dataclass
class SourceSplit:
    labels: np.ndarray  # int64, one per item of the source's split
    load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # indices -> (uint8 images, kept indices)


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, SourceSplit]  # train and test, and val where the source has one


def open_source(data: DataParams) -> Source:
    if data.source in ("cifar10", "cifar100"):
        return cifar_source(data.source, Path(data.root))
    if data.source == "imagefolder":
        return imagefolder_source(Path(data.root), data.stored_size, data.skip_unreadable)
    return synthetic_source(data.synthetic.classes, data.synthetic.train_per_class,
                            data.synthetic.test_per_class, data.stored_size or 32, data.split_seed)


def prepare(data: DataParams) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Returns {split: (images, labels)} for train, val and test, and the manifest.
    With data.val_fraction 0 and no val/ folder, the val split is empty."""
    source = open_source(data)
    seed = data.split_seed
    arrays, skipped = {}, {}
    for name, split in source.splits.items():
        chosen = cap_per_class(split.labels, data.limit_per_class, rng(seed, f"limit/{name}"))
        images, kept = split.load(chosen)
        arrays[name] = (images, split.labels[kept])
        skipped[name] = len(chosen) - len(kept)
    if "val" not in arrays:
        images, labels = arrays["train"]
        val = carve_val(labels, data.val_fraction, rng(seed, "val"))
        train = np.setdiff1d(np.arange(len(labels)), val)
        arrays["train"], arrays["val"] = (images[train], labels[train]), (images[val], labels[val])
    for name in SPLITS:
        if len(arrays[name][1]) == 0 and (name != "val" or data.has_validation):
            raise DataError(f"the {name} split is empty: raise data.limit_per_class or data.val_fraction")
    side = arrays["train"][0].shape[1]
    manifest = {
        "source": data.source,
        "classes": source.classes,
        "image_size": list(arrays["train"][0].shape[1:3]),
        "stored_size": {"side": side, "chosen_by": "data.stored_size" if data.stored_size else
                        ("the image folder (all its images are this size)" if data.source == "imagefolder"
                         else f"the source ({data.source} images are {side} px)")},
        "splits": {name: split_summary(*arrays[name], source.classes) for name in SPLITS},
        "skipped_unreadable": skipped,
    }
    return arrays, manifest


def rng(seed: int, purpose: str) -> np.random.Generator:
    """A generator per purpose, so that adding one use of randomness never shifts another."""
    return np.random.default_rng([seed, *purpose.encode()])


def cap_per_class(labels: np.ndarray, limit: int | None, generator: np.random.Generator) -> np.ndarray:
    """The first `limit` indices of each class in a seeded order, returned in source order."""
    if limit is None:
        return np.arange(len(labels))
    order = generator.permutation(len(labels))
    chosen = [order[labels[order] == c][:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def carve_val(labels: np.ndarray, fraction: float, generator: np.random.Generator) -> np.ndarray:
    """Sorted indices of a stratified validation split: round(fraction * n) of each class."""
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(generator.permutation(members)[: round(fraction * len(members))])
    return np.sort(np.concatenate(chosen))


def split_summary(images: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    counts = np.bincount(labels, minlength=len(classes))
    return {"count": int(len(labels)), "per_class": dict(zip(classes, map(int, counts)))}


# --- writing and reading the prepared arrays -------------------------------------------------

def save(arrays: dict, manifest: dict, folder: Path) -> None:
    """Into a new folder: never into files that DVC may have linked into its cache."""
    folder.mkdir(parents=True)
    for name, (images, labels) in arrays.items():
        np.save(folder / f"{name}_images.npy", images)
        np.save(folder / f"{name}_labels.npy", labels.astype(np.int64))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def load_split(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(folder / f"{name}_images.npy"), np.load(folder / f"{name}_labels.npy")


def load_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def num_classes(folder: Path) -> int:
    return len(load_manifest(folder)["classes"])


# --- CIFAR-10 and CIFAR-100: the official python archives ------------------------------------

def cifar_source(name: str, root: Path) -> Source:
    from torchvision.datasets import CIFAR10, CIFAR100
    dataset = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    folder = root / dataset.base_folder
    if not folder.is_dir():
        try:  # downloads if needed, verifies the archive's md5, extracts
            dataset(str(root), train=True, download=True)
        except OSError as error:
            raise DataError(
                f"could not get {dataset.filename} ({error.__class__.__name__}): put it in {root}/ "
                f"and run again, or work offline with data.source=imagefolder or synthetic") from None
    label_key = "labels" if name == "cifar10" else "fine_labels"
    classes = unpickle(folder / dataset.meta["filename"])[dataset.meta["key"]]
    splits = {}
    for split, files in (("train", dataset.train_list), ("test", dataset.test_list)):
        images, labels = read_cifar_batches([folder / file for file, _md5 in files], label_key)
        splits[split] = SourceSplit(labels, lambda idx, images=images: (images[idx], idx))
    return Source(list(classes), splits)


def unpickle(path: Path) -> dict:
    with open(path, "rb") as file:
        return pickle.load(file, encoding="latin1")


def read_cifar_batches(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The official batch format: `data` is N×3072 uint8 (channel-major 32×32), labels a list."""
    batches = [unpickle(path) for path in paths]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return np.ascontiguousarray(images), labels


# --- an image folder: root/{train,test[,val]}/<class>/<image> ---------------------------------

def imagefolder_source(root: Path, stored_size: int | None, skip_unreadable: bool) -> Source:
    names = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    listings = {name: list_images(root / name) for name in names}
    classes = sorted(listings["train"])
    for name, listing in listings.items():
        if sorted(listing) != classes:
            raise DataError(f"{root / name} has classes {sorted(listing)}, but {root / 'train'} has {classes}: "
                            "every split needs the same class folders")
    splits = {}
    for name, listing in listings.items():
        paths = [path for c in classes for path in listing[c]]
        labels = np.array([i for i, c in enumerate(classes) for _ in listing[c]], dtype=np.int64)
        splits[name] = SourceSplit(labels, lambda idx, paths=paths, name=name: decode_images(
            [paths[i] for i in idx], idx, stored_size, skip_unreadable, name))
    return Source(classes, splits)


def list_images(folder: Path) -> dict[str, list[Path]]:
    listing = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
               for d in sorted(folder.iterdir()) if d.is_dir()}
    empty = [c for c, paths in listing.items() if not paths]
    if not listing or empty:
        raise DataError(f"{folder} needs one folder of images per class (empty: {empty or 'no class folders'})")
    return listing


def decode_images(paths, indices, size: int | None, skip_unreadable, split):
    """RGB uint8 images, resized to size×size; with size None, kept at their own size, which
    all of them must share."""
    images, kept = [], []
    for path, index in zip(tqdm(paths, desc=f"decode {split}", unit="img", mininterval=2), indices):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if size and image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BICUBIC)
                images.append(np.asarray(image))
                kept.append(index)
        except (UnidentifiedImageError, OSError) as error:
            if not skip_unreadable:
                raise DataError(f"cannot read {path} ({error.__class__.__name__}): remove it, "
                                "or set data.skip_unreadable: true") from None
    sizes = sorted({image.shape[1::-1] for image in images})
    if len(sizes) > 1 or (sizes and sizes[0][0] != sizes[0][1]):
        shown = ", ".join(f"{w}×{h}" for w, h in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        raise DataError(f"the images of {split} are not all one square size ({shown}): "
                        "set data.stored_size to the side to store them at")
    stacked = np.stack(images) if images else np.zeros((0, size or 32, size or 32, 3), np.uint8)
    return stacked, np.asarray(kept, dtype=np.int64)


# --- synthetic: learnable, not trivial, no files ----------------------------------------------

def synthetic_source(classes: int, train_per_class: int, test_per_class: int, size: int, seed: int) -> Source:
    """Each class is a smooth random colour pattern, shown shifted, faded and under noise.

    Random pixel noise and a shared distractor pattern keep a linear probe on random
    features well below 100 %, while the class pattern keeps it well above chance.
    """
    generator = rng(seed, "synthetic")
    patterns = smooth_patterns(generator, classes, size)
    splits = {}
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes), per_class)
        images = render_synthetic(patterns, labels, rng(seed, f"synthetic/{name}"))
        splits[name] = SourceSplit(labels, lambda idx, images=images: (images[idx], idx))
    return Source([f"class_{c}" for c in range(classes)], splits)


def smooth_patterns(generator: np.random.Generator, count: int, size: int) -> np.ndarray:
    """`count` random 4×4×3 grids upsampled to size×size: low-frequency colour blobs in [-1, 1]."""
    coarse = generator.uniform(-1, 1, (count, 4, 4, 3))
    position = np.linspace(0, 3, size)
    low = np.floor(position).clip(0, 2).astype(int)
    weight = (position - low)[:, None]
    rows = coarse[:, low] * (1 - weight[None, :, :, None]) + coarse[:, low + 1] * weight[None, :, :, None]
    return rows[:, :, low] * (1 - weight[None, None, :, :]) + rows[:, :, low + 1] * weight[None, None, :, :]


def render_synthetic(patterns: np.ndarray, labels: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    n, size = len(labels), patterns.shape[1]
    strength = generator.uniform(0.3, 0.9, (n, 1, 1, 1))
    shifts = generator.integers(-size // 4, size // 4 + 1, (n, 2))
    signal = np.stack([np.roll(patterns[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts)])
    distractor = 0.5 * smooth_patterns(generator, n, size)
    noise = generator.normal(0, 0.25, signal.shape)
    images = 0.5 + 0.25 * (strength * signal + distractor + noise)
    return (images.clip(0, 1) * 255).round().astype(np.uint8)
