"""Data sources, decoded for prepare-data: the per-class cap, the stratified validation carve,
and the images written as arrays.py's prepared arrays.

Every source gives each of its splits as labels plus a reader of chosen images, so that
`data.limit_per_class` picks images before any file is decoded.
"""
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from stages.data.arrays import SPLITS, DataError, rng
from stages.pipeline.params import DataParams, resize_side

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
OS_FILES = {"thumbs.db", "desktop.ini", "icon\r"}  # what Windows and macOS leave in folders (besides dot files)


@dataclass
class SourceSplit:
    labels: np.ndarray  # int64, one per item of the source's split
    sizes: Callable[[np.ndarray], list[tuple[int, int]]]  # indices -> (width, height) of each one that opens
    # (indices, side, skipped) -> (index, S×S×3) of each image used; `skipped` counts the others by reason
    images: Callable[[np.ndarray, int, Counter], Iterator[tuple[int, np.ndarray]]]


@dataclass
class Source:
    classes: list[str]
    splits: dict[str, SourceSplit]  # train and test, and val where the source has one
    ignored: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {why: files}: not images


class Unusable(Exception):
    """An image file that cannot be used: `reason` is what the manifest counts, the message adds detail."""
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason = reason


def open_source(data: DataParams) -> Source:
    if data.source in ("cifar10", "cifar100"):
        return cifar_source(data.source, Path(data.root))
    if data.source == "imagefolder":
        return imagefolder_source(Path(data.root), data.skip_unreadable, data.max_image_pixels)
    return synthetic_source(data.synthetic.classes, data.synthetic.train_per_class,
                            data.synthetic.test_per_class, data.stored_size or 32, data.split_seed)


@dataclass
class Plan:
    """Which images of the source go where, decided before any image is decoded."""
    chosen: dict[str, np.ndarray]  # per source split: the indices kept by data.limit_per_class
    carves: bool  # the source has no val split: the validation carve makes one from train
    val: set[int]  # indices of the source's train split that the carve takes (none with data.val_fraction 0)
    side: int  # the stored images' side
    stored: dict  # the manifest's account of that side


def prepare(data: DataParams, folder: Path) -> dict:
    """Writes {train,val,test}_{images,labels}.npy and manifest.json into a new `folder`, and
    returns the manifest. Without a val split in the source, val is carved from the chosen train
    images (none with data.val_fraction 0); an unreadable image that is skipped leaves its split."""
    source = open_source(data)
    plan = planned(source, data)
    folder.mkdir(parents=True)
    labels, skipped = {}, {}
    for name, split in source.splits.items():
        skipped[name] = Counter()
        labels.update(write_split(split, name, plan, folder, skipped[name]))
    check_every_class_kept(labels, source.classes, skipped, data.has_validation)
    manifest = {
        "source": data.source,
        "classes": source.classes,
        "image_size": [plan.side, plan.side],
        "stored_size": plan.stored,
        "splits": {name: split_summary(labels[name], source.classes) for name in SPLITS},
        "skipped_unreadable": {name: dict(sorted(reasons.items())) for name, reasons in skipped.items()},
        "ignored": source.ignored,
    }
    write_manifest(folder, manifest)
    return manifest


def planned(source: Source, data: DataParams) -> Plan:
    chosen = {name: cap_per_class(split.labels, data.limit_per_class, rng(data.split_seed, f"limit/{name}"))
              for name, split in source.splits.items()}
    carves, val = "val" not in source.splits, set()
    if carves:
        train = chosen["train"]
        val = set(train[carve_val(source.splits["train"].labels[train], data.val_fraction,
                                  rng(data.split_seed, "val"))].tolist())
    sizes = [] if data.stored_size else [size for name, split in source.splits.items()
                                          for size in split.sizes(chosen[name])]
    return Plan(chosen, carves, val, *stored_side(data, sizes))


def write_split(split: SourceSplit, name: str, plan: Plan, folder: Path, skipped: Counter) -> dict[str, np.ndarray]:
    """Decodes one source split into its prepared files (train into train and val, when carving);
    returns the labels of each file written."""
    picked = plan.chosen[name]
    carving = name == "train" and plan.carves
    capacity = {"train": len(picked) - len(plan.val), "val": len(plan.val)} if carving else {name: len(picked)}
    files = {target: ImageFile(folder, target, count, plan.side) for target, count in capacity.items()}
    kept = {target: [] for target in capacity}
    for index, image in split.images(picked, plan.side, skipped):
        target = "val" if carving and index in plan.val else name
        files[target].write(image)
        kept[target].append(index)
    labels = {}
    for target, file in files.items():
        file.close()
        labels[target] = split.labels[np.asarray(kept[target], dtype=np.int64)]
        write_labels(folder, target, labels[target])
    return labels


def check_every_class_kept(labels: dict[str, np.ndarray], classes: list[str], skipped: dict, has_validation: bool):
    for name in SPLITS:
        if len(labels[name]) == 0 and (name != "val" or has_validation):
            raise DataError(f"the {name} split is empty: raise data.limit_per_class or data.val_fraction")
    for name in ("train", "test"):
        missing = [c for i, c in enumerate(classes) if not (labels[name] == i).any()]
        if missing:
            raise DataError(f"class {missing[0]} has no image left in the {name} split (skipped as unusable: "
                            f"{dict(skipped.get(name, {})) or 'none'}; data.val_fraction carves val from the rest): "
                            "give it more images that can be used, or lower data.val_fraction")


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
    """Sorted indices of a stratified validation split: val_share(n, fraction) of each class's n."""
    chosen = [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(generator.permutation(members)[:val_share(len(members), fraction)])
    return np.sort(np.concatenate(chosen))


def val_share(count: int, fraction: float) -> int:
    """How many of a class's `count` training images the validation carve takes."""
    return round(fraction * count)


def train_left(data: DataParams, train_counts: dict[str, int] | None = None) -> dict[str, int]:
    """{class: its training images after data.limit_per_class and the validation carve}, from the
    source's description alone (nothing decoded). `train_counts`: an image folder's files per class."""
    if data.source == "imagefolder":  # the image files of each class, dot files and litter left out
        counts = train_counts or {c: len(paths) for c, paths in list_images(Path(data.root, "train"))[0].items()}
    elif data.source == "synthetic":
        counts = {f"class_{c}": data.synthetic.train_per_class for c in range(data.synthetic.classes)}
    else:
        counts = {"each class": CIFAR_TRAIN_PER_CLASS[data.source]}
    own_val = data.source == "imagefolder" and Path(data.root, "val").is_dir()
    capped = {c: min(n, data.limit_per_class or n) for c, n in counts.items()}
    return {c: n - (0 if own_val else val_share(n, data.val_fraction)) for c, n in capped.items()}


def split_summary(labels: np.ndarray, classes: list[str]) -> dict:
    counts = np.bincount(labels, minlength=len(classes))
    return {"count": int(len(labels)), "per_class": dict(zip(classes, map(int, counts)))}


def in_memory(images: np.ndarray) -> tuple[Callable, Callable]:
    """The sizes and images readers of a split that is one array already at its stored size."""
    side = images.shape[2], images.shape[1]
    return (lambda indices: [side] * len(indices),
            lambda indices, _side, _skipped: ((int(i), images[i]) for i in tqdm(indices, desc="write", unit="img",
                                                                     mininterval=2, disable=len(indices) < 20000)))


# --- writing the prepared arrays (arrays.py reads them) -------------------------------------

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


# --- CIFAR-10 and CIFAR-100: torchvision's datasets ------------------------------------------

CIFAR_TRAIN_PER_CLASS = {"cifar10": 5000, "cifar100": 500}  # the datasets' published sizes

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

def imagefolder_source(root: Path, skip_unreadable: bool, max_pixels: int) -> Source:
    Image.MAX_IMAGE_PIXELS = None  # PIL's decompression-bomb check: data.max_image_pixels is ours, on each header
    classes, listings, ignored = list_splits(root)
    splits = {}
    for name, listing in listings.items():
        paths = [path for c in classes for path in listing[c]]
        labels = np.array([i for i, c in enumerate(classes) for _ in listing[c]], dtype=np.int64)
        splits[name] = SourceSplit(
            labels, lambda idx, paths=paths: image_sizes([paths[i] for i in idx], max_pixels),
            lambda idx, side, skipped, paths=paths, name=name: decode_images(paths, idx, side, skip_unreadable,
                                                                            max_pixels, skipped, name))
    return Source(classes, splits, ignored)


def list_splits(root: Path) -> tuple[list[str], dict[str, dict[str, list[Path]]], dict[str, dict[str, int]]]:
    """The classes, {split: {class: image paths}} and {split: {why: count}} of the files left out;
    a split whose classes differ from train's stops with one line (check-inputs asks first, so
    that it stops before DVC removes anything)."""
    listings, ignored = {}, {}
    for name in (s for s in ("train", "val", "test") if (root / s).is_dir()):
        listings[name], ignored[name] = list_images(root / name)
    classes = sorted(listings["train"])
    for name, listing in listings.items():
        if sorted(listing) != classes:
            raise DataError(f"{root / name} has classes {sorted(listing)}, but {root / 'train'} has {classes}: "
                            "every split needs the same class folders")
    return classes, listings, ignored


def list_images(folder: Path) -> tuple[dict[str, list[Path]], dict[str, int]]:
    """{class: image paths} of a split's class folders, and {why: count} of the files left out: dot
    files and what operating systems leave behind, files without an image extension, subfolders.
    A file with an image extension that holds no image is decode_images' to name."""
    listing, ignored = {}, Counter()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):  # scandir: no stat per file
        if not entry.is_dir() or entry.name.startswith("."):
            ignored[ignorable(entry) or "outside a class folder"] += 1
            continue
        listing[entry.name] = []
        for file in sorted(os.scandir(entry.path), key=lambda e: e.name):
            why = ignorable(file) or ("a subfolder" if file.is_dir() else None)
            if why:
                ignored[why] += 1
            else:
                listing[entry.name].append(Path(file.path))
    empty = [c for c, paths in listing.items() if not paths]
    if not listing or empty:
        raise DataError(f"{folder} needs one folder of images per class (with no image file: "
                        f"{', '.join(empty) or 'no class folders'})")
    return listing, dict(sorted(ignored.items()))


def ignorable(entry: os.DirEntry) -> str | None:
    """Why a file is not taken for an image, if it is not."""
    if entry.name.startswith("."):
        return "a dot file (hidden, or macOS's ._ and .DS_Store)"
    if entry.name.lower() in OS_FILES:
        return "an operating system's file"
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS and not entry.is_dir():
        return "no image extension"
    return None


def opened(path: Path, max_pixels: int) -> Image.Image:
    """The image, its header read; Unusable, saying why, if it cannot be used."""
    try:
        empty = path.stat().st_size == 0
        image = None if empty else Image.open(path)
    except FileNotFoundError:
        raise Unusable("a broken symlink" if path.is_symlink() else "gone") from None
    except PermissionError:
        raise Unusable("permission denied") from None
    except UnidentifiedImageError:
        raise Unusable("not an image that PIL reads") from None
    except Exception as error:  # OSError, or what a damaged header makes a plugin raise (ValueError, SyntaxError)
        raise Unusable("unreadable", error.__class__.__name__) from None
    if empty:
        raise Unusable("an empty file")
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise Unusable("over data.max_image_pixels", f"{width}×{height} pixels, the limit {max_pixels:,}")
    return image


def image_sizes(paths: list[Path], max_pixels: int) -> list[tuple[int, int]]:
    """(width, height) of each image that opens, from its header (decode_images names the others)."""
    sizes = []
    for path in tqdm(paths, desc="sizes", unit="img", mininterval=2, disable=len(paths) < 20000):
        try:
            with opened(path, max_pixels) as image:
                sizes.append(image.size)
        except Unusable:
            pass
    return sizes


def decode_images(paths, indices, side: int, skip_unreadable: bool, max_pixels: int, skipped: Counter,
                  split: str) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB uint8 side×side×3) for each image that decodes, in order, turned upright by its
    EXIF orientation. One that cannot be used stops prepare-data with one line naming it, or with
    data.skip_unreadable is counted in `skipped` by reason."""
    for index in tqdm(indices, desc=f"decode {split}", unit="img", mininterval=2):
        try:
            image = decoded(paths[index], max_pixels)
        except Unusable as unusable:
            if not skip_unreadable:
                fix = ", or raise data.max_image_pixels" if unusable.reason == "over data.max_image_pixels" else ""
                raise DataError(f"cannot use {paths[index]}: {unusable}: remove it, or set data.skip_unreadable: "
                                f"true{fix}") from None
            skipped[unusable.reason] += 1
            continue
        with image:  # our own code from here: its errors are ours, never a damaged image's
            yield int(index), np.asarray(resized_and_cropped(as_rgb(upright(image)), side))


def decoded(path: Path, max_pixels: int) -> Image.Image:
    """The image with its pixels read; Unusable, saying why, if it cannot be used."""
    image = opened(path, max_pixels)
    try:
        image.load()
    except Exception as error:  # whatever a damaged file makes PIL's decoders raise: OSError, SyntaxError, ValueError ...
        image.close()
        raise Unusable("cannot be decoded", error.__class__.__name__) from None
    return image


def upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation; as stored when its EXIF cannot be read (the pixels
    still can, and were used before orientation was applied)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # struct.error, TypeError, ValueError from a malformed EXIF block
        return image


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
