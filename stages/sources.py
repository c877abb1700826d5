"""Data sources, decoded for prepare-data: the per-class cap, the stratified validation carve,
and the images written as data.py's prepared arrays.

Every source gives each of its splits as labels plus a reader of chosen images, so that
`data.limit_per_class` picks images before any file is decoded.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stages.data import SPLITS, DataError, ImageFile, rng, write_labels, write_manifest
from stages.params import DataParams, resize_side

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class SourceSplit:
    labels: np.ndarray  # int64, one per item of the source's split
    sizes: Callable[[np.ndarray], list[tuple[int, int]]]  # indices -> (width, height) of each one that opens
    images: Callable[[np.ndarray, int], Iterator[tuple[int, np.ndarray]]]  # (indices, side) -> (index, S×S×3) each


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, SourceSplit]  # train and test, and val where the source has one


def open_source(data: DataParams) -> Source:
    if data.source in ("cifar10", "cifar100"):
        return cifar_source(data.source, Path(data.root))
    if data.source == "imagefolder":
        return imagefolder_source(Path(data.root), data.skip_unreadable)
    return synthetic_source(data.synthetic.classes, data.synthetic.train_per_class,
                            data.synthetic.test_per_class, data.stored_size or 32, data.split_seed)


def prepare(data: DataParams, folder: Path) -> dict:
    """Writes {train,val,test}_{images,labels}.npy and manifest.json into a new `folder`, and
    returns the manifest. Without a val split in the source, val is carved from the chosen train
    images (none with data.val_fraction 0); an unreadable image that is skipped leaves its split."""
    source = open_source(data)
    chosen = {name: cap_per_class(split.labels, data.limit_per_class, rng(data.split_seed, f"limit/{name}"))
              for name, split in source.splits.items()}
    sizes = [] if data.stored_size else [size for name, split in source.splits.items()
                                          for size in split.sizes(chosen[name])]
    side, stored = stored_side(data, sizes)
    folder.mkdir(parents=True)
    labels, skipped = {}, {}
    for name, split in source.splits.items():
        picked, val = chosen[name], set()
        carving = name == "train" and "val" not in source.splits
        if carving:
            val = set(picked[carve_val(split.labels[picked], data.val_fraction, rng(data.split_seed, "val"))].tolist())
        capacity = {"train": len(picked) - len(val), "val": len(val)} if carving else {name: len(picked)}
        files = {target: ImageFile(folder, target, count, side) for target, count in capacity.items()}
        kept = {target: [] for target in capacity}
        for index, image in split.images(picked, side):
            target = "val" if index in val else name
            files[target].write(image)
            kept[target].append(index)
        for target, file in files.items():
            file.close()
            labels[target] = split.labels[np.asarray(kept[target], dtype=np.int64)]
            write_labels(folder, target, labels[target])
        skipped[name] = len(picked) - sum(map(len, kept.values()))
    for name in SPLITS:
        if len(labels[name]) == 0 and (name != "val" or data.has_validation):
            raise DataError(f"the {name} split is empty: raise data.limit_per_class or data.val_fraction")
    manifest = {
        "source": data.source,
        "classes": source.classes,
        "image_size": [side, side],
        "stored_size": stored,
        "splits": {name: split_summary(labels[name], source.classes) for name in SPLITS},
        "skipped_unreadable": skipped,
    }
    write_manifest(folder, manifest)
    return manifest


def stored_side(data: DataParams, sizes: list[tuple[int, int]]) -> tuple[int, dict]:
    """The side to store the images at, and the manifest's account of it: data.stored_size; else
    the images' own size when they all share one square size; else the side the model's input is
    resized to (data.image_size / data.crop_pct), counting the images that this enlarges."""
    if data.stored_size:
        return data.stored_size, {"side": data.stored_size, "chosen_by": "data.stored_size"}
    shapes = set(sizes)
    if len(shapes) <= 1 and all(w == h for w, h in shapes):
        side = next(iter(shapes), (32, 32))[0]
        return side, {"side": side, "chosen_by": "the images' own size (all of them are this size)"}
    side = resize_side(data.image_size, data.crop_pct)
    return side, {"side": side, "chosen_by": "data.image_size / data.crop_pct, since the images differ in size",
                  "enlarged": sum(min(w, h) < side for w, h in sizes)}


def cap_per_class(labels: np.ndarray, limit: int | None, generator: np.random.Generator) -> np.ndarray:
    """The first `limit` indices of each class in a seeded order, returned in source order."""
    if limit is None:
        return np.arange(len(labels))
    order = generator.permutation(len(labels))
    chosen = [order[labels[order] == c][:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def carve_val(labels: np.ndarray, fraction: float, generator: np.random.Generator) -> np.ndarray:
    """Sorted indices of a stratified validation split: round(fraction * n) of each class."""
    chosen = [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(generator.permutation(members)[: round(fraction * len(members))])
    return np.sort(np.concatenate(chosen))


def split_summary(labels: np.ndarray, classes: list[str]) -> dict:
    counts = np.bincount(labels, minlength=len(classes))
    return {"count": int(len(labels)), "per_class": dict(zip(classes, map(int, counts)))}


def in_memory(images: np.ndarray) -> tuple[Callable, Callable]:
    """The sizes and images readers of a split that is one array already at its stored size."""
    side = images.shape[2], images.shape[1]
    return (lambda indices: [side] * len(indices),
            lambda indices, _side: ((int(i), images[i]) for i in tqdm(indices, desc="write", unit="img",
                                                                     mininterval=2, disable=len(indices) < 20000)))


# --- CIFAR-10 and CIFAR-100: torchvision's datasets ------------------------------------------

def cifar_source(name: str, root: Path) -> Source:
    from torchvision.datasets import CIFAR10, CIFAR100
    dataset = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    try:  # downloads if needed, verifies every file's md5, extracts; then reads the batches
        splits = {"train": dataset(str(root), train=True, download=True), "test": dataset(str(root), train=False)}
    except (OSError, RuntimeError) as error:
        raise DataError(
            f"could not get {dataset.filename} ({error.__class__.__name__}): put it in {root}/ "
            f"and run again, or work offline with data.source=imagefolder or synthetic") from None
    return Source(list(splits["train"].classes),
                  {split: SourceSplit(np.asarray(d.targets, dtype=np.int64), *in_memory(d.data))
                   for split, d in splits.items()})


# --- an image folder: root/{train,test[,val]}/<class>/<image> ---------------------------------

def imagefolder_source(root: Path, skip_unreadable: bool) -> Source:
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
        splits[name] = SourceSplit(
            labels, lambda idx, paths=paths: image_sizes([paths[i] for i in idx]),
            lambda idx, side, paths=paths, name=name: decode_images(paths, idx, side, skip_unreadable, name))
    return Source(classes, splits)


def list_images(folder: Path) -> dict[str, list[Path]]:
    listing = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
               for d in sorted(folder.iterdir()) if d.is_dir()}
    empty = [c for c, paths in listing.items() if not paths]
    if not listing or empty:
        raise DataError(f"{folder} needs one folder of images per class (empty: {empty or 'no class folders'})")
    return listing


def image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(width, height) of each image that opens, from its header (decode_images names the others)."""
    sizes = []
    for path in tqdm(paths, desc="sizes", unit="img", mininterval=2, disable=len(paths) < 20000):
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except (UnidentifiedImageError, OSError):
            pass
    return sizes


def decode_images(paths, indices, side: int, skip_unreadable, split) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB uint8 side×side×3) for each image that decodes, in order."""
    for index in tqdm(indices, desc=f"decode {split}", unit="img", mininterval=2):
        try:
            with Image.open(paths[index]) as image:
                yield int(index), np.asarray(resized_and_cropped(as_rgb(image), side))
        except (UnidentifiedImageError, OSError) as error:
            if not skip_unreadable:
                raise DataError(f"cannot read {paths[index]} ({error.__class__.__name__}): remove it, "
                                "or set data.skip_unreadable: true") from None


def as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; 16-bit (and 32-bit integer) grey keeps its top 8 bits, where PIL's
    own conversion would clip it to white."""
    if image.mode.startswith("I"):
        grey = np.asarray(image).astype(np.int64)
        image = Image.fromarray((grey >> 8).clip(0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def resized_and_cropped(image: Image.Image, side: int) -> Image.Image:
    """torchvision's Resize(side) + CenterCrop(side): the shorter side to `side`, then the centre."""
    if image.size == (side, side):
        return image
    from torchvision.transforms import InterpolationMode, functional
    return functional.center_crop(functional.resize(image, side, InterpolationMode.BICUBIC), side)


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
        splits[name] = SourceSplit(labels, *in_memory(images))
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
