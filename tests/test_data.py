import hashlib
import io
import json
import os
import pickle
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
from PIL import Image

from stages import check_inputs, prepare_data
from stages.data import arrays, sources
from stages.pipeline import param_checks, params
from stages.pipeline.errors import run_stage
from tests.conftest import CIFAR_JPEG, FAST, needs_shared, set_params, unpack_cifar_jpeg


def data_params(project, **changes) -> params.DataParams:
    set_params(project / "params.yaml", {**FAST, **{f"data.{k}": v for k, v in changes.items()}})
    return param_checks.load().data


def test_synthetic_source_is_seeded_balanced_and_split(project):
    prepared, manifest = prepare(data_params(project, val_fraction=0.1))
    again, _ = prepare(data_params(project, val_fraction=0.1))
    other, _ = prepare(data_params(project, val_fraction=0.1, split_seed=1))
    assert all(np.array_equal(prepared[s][0], again[s][0]) for s in arrays.SPLITS)
    assert not np.array_equal(prepared["train"][0], other["train"][0])
    assert manifest["splits"]["train"]["count"] == 540 and manifest["splits"]["val"]["count"] == 60
    assert set(manifest["splits"]["val"]["per_class"].values()) == {6}
    assert manifest["splits"]["test"]["count"] == 300
    assert prepared["train"][0].shape == (540, 32, 32, 3) and prepared["train"][0].dtype == np.uint8


def test_synthetic_classes_differ_but_overlap(project):
    """A nearest-class-mean classifier on raw pixels beats chance, but is far from perfect."""
    prepared, _ = prepare(data_params(project))
    (train, train_y), (test, test_y) = prepared["train"], prepared["test"]
    means = np.stack([train[train_y == c].reshape(-1, 32 * 32 * 3).mean(0) for c in range(10)])
    distances = ((test.reshape(len(test), -1)[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == test_y).mean()
    assert 0.2 < accuracy < 0.9


def test_cap_per_class_takes_the_first_n_in_a_seeded_order():
    labels = np.repeat(np.arange(3), 10)
    chosen = sources.cap_per_class(labels, 4, arrays.rng(0, "x"))
    assert np.bincount(labels[chosen]).tolist() == [4, 4, 4] and np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, sources.cap_per_class(labels, 4, arrays.rng(0, "x")))
    assert not np.array_equal(chosen, sources.cap_per_class(labels, 4, arrays.rng(1, "x")))
    more = sources.cap_per_class(labels, 6, arrays.rng(0, "x"))
    assert set(chosen) <= set(more)


def test_training_subsets_are_balanced_nested_seeded_and_leave_val_and_test_whole(project):
    prepared, _ = prepare(data_params(project, val_fraction=0.1))
    folder = next(Path(".").glob("tmp*/prepared"))
    labels = prepared["train"][1]
    names = [f"class_{c}" for c in range(10)]
    small, large = (arrays.train_subset(labels, n, 0, names) for n in (5, 20))
    assert np.bincount(labels[small]).tolist() == [5] * 10 and np.bincount(labels[large]).tolist() == [20] * 10
    assert set(small) <= set(large) and np.all(np.diff(large) > 0)
    assert np.array_equal(small, arrays.train_subset(labels, 5, 0, names))
    assert not np.array_equal(small, arrays.train_subset(labels, 5, 1, names))  # seeds average over subsets
    images, subset_labels = arrays.open_train_subset(folder, 5, 0)
    assert np.array_equal(images, prepared["train"][0][small]) and np.array_equal(subset_labels, labels[small])
    assert arrays.open_train_subset(folder, None, 0)[0].shape == prepared["train"][0].shape
    with pytest.raises(arrays.DataError, match="class_0 has only 54 training images"):
        arrays.train_subset(labels, 55, 0, names)


def test_a_training_size_above_what_a_class_holds_is_refused_before_anything_runs(project):
    check_inputs.check_train_per_class(data_params(project, val_fraction=0.1, train_per_class=54))
    with pytest.raises(params.ParamError, match="class_0 has 54 .got 55"):
        check_inputs.check_train_per_class(data_params(project, val_fraction=0.1, train_per_class=55))
    with pytest.raises(params.ParamError, match="data.train_per_class must be a positive integer"):
        data_params(project, train_per_class=0)
    make_folder(project / "images", per_class=4)
    for litter in (".DS_Store", "._0.jpg", "Thumbs.db"):  # not images: not counted
        (project / "images/train/cat" / litter).write_bytes(b"")
    check_inputs.check_train_per_class(folder_params(project, val_fraction=0, train_per_class=4))
    with pytest.raises(params.ParamError, match="cat has 4 .got 5"):
        check_inputs.check_train_per_class(folder_params(project, val_fraction=0, train_per_class=5))


def prepare(data_params: params.DataParams) -> tuple[dict, dict]:
    """data.prepare into a new folder: ({split: (images, labels)}, manifest)."""
    folder = Path(tempfile.mkdtemp(dir=".")) / "prepared"
    manifest = sources.prepare(data_params, folder)
    return {name: tuple(np.array(a) for a in arrays.open_split(folder, name)) for name in arrays.SPLITS}, manifest


def test_prepare_data_writes_byte_identical_files(project):
    set_params(project / "params.yaml", FAST)
    prepare_data.main()
    first = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}
    prepare_data.main()
    second = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}
    assert first == second and len(first) == 7


def write_cifar_batches(folder, label_key, classes, per_batch=20):
    """Small files in the official python format of CIFAR-10/100."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if label_key == "labels" else ["train", "test"]
    for name in files:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 label_key: list(rng.integers(0, len(classes), per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = "batches.meta" if label_key == "labels" else "meta"
    key = "label_names" if label_key == "labels" else "fine_label_names"
    (folder / meta).write_bytes(pickle.dumps({key: classes}))
    return folder / files[0]


@pytest.mark.parametrize("source, folder, label_key, n_classes", [
    ("cifar10", "cifar-10-batches-py", "labels", 10), ("cifar100", "cifar-100-python", "fine_labels", 100)])
def test_cifar_is_read_by_torchvision_channel_last(project, monkeypatch, source, folder, label_key, n_classes):
    from torchvision.datasets import CIFAR10, CIFAR100
    dataset = {"cifar10": CIFAR10, "cifar100": CIFAR100}[source]
    classes = [f"c{i}" for i in range(n_classes)]
    first = write_cifar_batches(project / "data/raw" / folder, label_key, classes)
    for listing in ("train_list", "test_list"):  # torchvision checks each file against these md5s
        files = [[name, hashlib.md5((first.parent / name).read_bytes()).hexdigest()]
                 for name, _md5 in getattr(dataset, listing)]
        monkeypatch.setattr(dataset, listing, files)
    meta = first.parent / dataset.meta["filename"]
    monkeypatch.setattr(dataset, "meta", {**dataset.meta, "md5": hashlib.md5(meta.read_bytes()).hexdigest()})
    src = sources.open_source(data_params(project, source=source))
    batch = pickle.loads(first.read_bytes())
    images = dict(src.splits["train"].images(np.arange(3), 32, Counter()))
    assert src.classes == classes and images[1].shape == (32, 32, 3)
    assert np.array_equal(images[1][:, :, 0].ravel(), batch["data"][1, :1024])  # red plane first
    assert np.array_equal(images[1][0, 0], batch["data"][1, [0, 1024, 2048]])
    assert src.splits["train"].labels[:20].tolist() == batch[label_key]
    assert len(src.splits["test"].labels) == 20
    (first.parent / "test_batch" if source == "cifar10" else first.parent / "test").write_bytes(b"truncated")
    with pytest.raises(arrays.DataError, match=r"could not get .* put it in data/raw/"):  # corrupt, and offline
        monkeypatch.setattr("torchvision.datasets.utils.urllib.request.urlopen", offline)
        sources.open_source(data_params(project, source=source))


def offline(*args, **kwargs):
    raise URLError("no network")


def test_cifar_offline_without_the_archive_says_where_to_put_it(project, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.utils.urllib.request.urlopen", offline)
    with pytest.raises(arrays.DataError, match=r"put it in data/raw/ .* data.source=imagefolder or synthetic"):
        sources.open_source(data_params(project, source="cifar10"))


def write_image(path, size, color, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB" if fmt != "L" else "L", (size, size), color).save(path, format=None)


def make_folder(root, splits=("train", "test"), per_class=4, sizes=(32, 48)):
    for split in splits:
        for c, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            for i in range(per_class):
                ext = [".jpg", ".JPEG", ".png", ".Png"][i % 4]
                write_image(root / split / c / f"{i}{ext}", sizes[i % len(sizes)], color)


def folder_params(project, **changes):
    return data_params(project, source="imagefolder", root="images", stored_size=32, **changes)


def test_imagefolder_reads_any_case_any_size_and_carves_val(project):
    make_folder(project / "images", per_class=10)
    (project / "images/train/cat/notes.txt").write_text("not an image")
    prepared, manifest = prepare(folder_params(project, val_fraction=0.2))
    assert manifest["classes"] == ["cat", "dog"]
    assert {s: manifest["splits"][s]["count"] for s in arrays.SPLITS} == {"train": 16, "val": 4, "test": 20}
    images, labels = prepared["test"]
    assert images.shape == (20, 32, 32, 3)
    assert images[labels == 0][:, :, :, 0].mean() > 150 and images[labels == 1][:, :, :, 2].mean() > 150


def test_imagefolder_uses_its_own_val_split(project):
    make_folder(project / "images", splits=("train", "val", "test"))
    _, manifest = prepare(folder_params(project))
    assert {s: manifest["splits"][s]["count"] for s in arrays.SPLITS} == {"train": 8, "val": 8, "test": 8}


def test_imagefolder_splits_must_have_the_same_classes(project):
    make_folder(project / "images")
    write_image(project / "images/test/bird/0.png", 32, (0, 200, 0))
    with pytest.raises(arrays.DataError, match="has classes .*bird.*every split needs the same class folders"):
        prepare(folder_params(project))


def test_an_unreadable_image_is_named_or_skipped_and_counted(project):
    make_folder(project / "images")
    (project / "images/train/dog/broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(arrays.DataError, match=r"cannot use .*broken.jpg: not an image that PIL reads: .*skip_unreadable: true"):
        prepare(folder_params(project))
    _, manifest = prepare(folder_params(project, skip_unreadable=True,
                                                  val_fraction=0.25))
    assert manifest["skipped_unreadable"] == {"train": {"not an image that PIL reads": 1}, "test": {}}
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 8


def litter_and_unusable_files(root: Path) -> dict[str, int]:
    """One file of each kind that an image folder may hold beside its images, in train/cat; returns
    {reason: count} of those that cannot be used (what the manifest should count when skipping)."""
    cat = root / "train" / "cat"
    for name in (".DS_Store", "._0.jpg", "Thumbs.db", "desktop.ini", "notes.txt"):
        (cat / name).write_bytes(b"\0\1 litter")
    (root / "train" / ".hidden_folder").mkdir()
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "heic_or_text.png").write_text("not an image, whatever its extension says")
    (cat / "bad_header.ppm").write_bytes(b"P6\n4| 3\n255\n")  # PIL's PPM plugin raises ValueError on it
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    (cat / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    write_image(cat / "huge.png", 200, (10, 200, 10))  # 40,000 pixels, over the tests' data.max_image_pixels
    (cat / "gone.jpg").symlink_to(root / "nowhere.jpg")
    write_image(cat / "png_named.jpg", 32, (200, 30, 30))  # an extension that lies: decoded by its content
    Image.new("P", (32, 32)).save(cat / "palette.png", transparency=0)
    write_image(cat / "locked.png", 32, (200, 30, 30))
    (cat / "locked.png").chmod(0)
    readable_by_all = os.access(cat / "locked.png", os.R_OK)  # root reads it anyway
    unusable = {"an empty file": 1, "not an image that PIL reads": 1, "unreadable": 1, "cannot be decoded": 1,
                "over data.max_image_pixels": 1, "a broken symlink": 1, "permission denied": 0 if readable_by_all else 1}
    return {reason: n for reason, n in unusable.items() if n}


def test_every_file_an_image_folder_holds_ends_in_one_line_or_is_skipped_and_counted_by_reason(project, capsys):
    make_folder(project / "images")
    unusable = litter_and_unusable_files(project / "images")
    set_params(project / "params.yaml", {**FAST, "data.source": "imagefolder", "data.root": "images",
                                         "data.stored_size": None, "data.max_image_pixels": 10_000})
    with pytest.raises(SystemExit) as stopped:
        run_stage(prepare_data.main)
    err = capsys.readouterr().err
    said = err.strip().splitlines()[-1]  # after the progress bar's
    assert stopped.value.code == 2 and err.count("error") == 1 and said.startswith("error: cannot use images/train/cat/")
    assert "data.skip_unreadable: true" in said and "Traceback" not in err

    set_params(project / "params.yaml", {"data.skip_unreadable": True})
    run_stage(prepare_data.main)
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert manifest["skipped_unreadable"]["train"] == dict(sorted(unusable.items()))
    assert manifest["ignored"]["train"] == {"a dot file (hidden, or macOS's ._ and .DS_Store)": 3,
                                            "an operating system's file": 2, "no image extension": 1}
    used = 4 + 3 - (1 if "permission denied" in unusable else 0)  # the 4 made, png_named, palette, locked
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 4 + used


def test_a_class_whose_every_image_is_skipped_stops_prepare_data_in_one_line(project):
    make_folder(project / "images")
    for split in ("train", "test"):
        (project / "images" / split / "bird").mkdir()
        (project / "images" / split / "bird" / "empty.jpg").write_bytes(b"")
    with pytest.raises(arrays.DataError, match=r"class bird has no image left in the train split .*an empty file"):
        prepare(folder_params(project, skip_unreadable=True))


def test_an_image_whose_exif_cannot_be_read_is_used_as_stored(monkeypatch):
    def malformed(image):
        raise struct.error("required argument is not an integer")  # what PIL raised on a damaged EXIF block

    monkeypatch.setattr(sources.ImageOps, "exif_transpose", malformed)
    image = Image.new("RGB", (4, 2))
    assert sources.upright(image) is image


def test_an_image_is_turned_upright_by_its_exif_orientation(project):
    make_folder(project / "images", per_class=2, sizes=(32,))
    photo = np.zeros((32, 64, 3), np.uint8)
    photo[:, :32] = 255  # white left half, black right: wider than tall
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(photo).save(project / "images/test/cat/rotated.jpg", exif=exif, quality=95)
    prepared, _ = prepare(data_params(project, source="imagefolder", root="images", image_size=32, crop_pct=1.0))
    images, labels = prepared["test"]
    upright = images[-3]  # test/cat: 0.jpg, 1.JPEG, rotated.jpg (sorted), then dog's
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # turned: the white half is now on top


@pytest.mark.parametrize("layout, message", [
    ("val_class", "has classes .*bird.*every split needs the same class folders"),
    ("empty_class", "needs one folder of images per class .with no image file: bird"),
    ("root_file", "data.root must hold train/<class>/ image folders"),
])
def test_a_folder_structure_mistake_stops_check_inputs_in_one_line(project, capsys, layout, message):
    make_folder(project / "images", splits=("train", "val", "test"))
    if layout == "val_class":
        write_image(project / "images/val/bird/0.png", 32, (0, 200, 0))
    elif layout == "empty_class":
        for split in ("train", "val", "test"):
            (project / "images" / split / "bird").mkdir()
            (project / "images" / split / "bird" / ".DS_Store").write_bytes(b"")
    root = "images" if layout != "root_file" else "images/train/cat/0.jpg"
    set_params(project / "params.yaml", {**FAST, "data.source": "imagefolder", "data.root": root})
    with pytest.raises(SystemExit) as stopped:
        run_stage(check_inputs.main)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and re.search(message, err), err


def test_an_empty_split_is_an_error(project):
    make_folder(project / "images", per_class=2)
    with pytest.raises(arrays.DataError, match="the val split is empty"):
        prepare(folder_params(project, val_fraction=0.1))


def test_a_folder_of_one_square_size_is_stored_at_that_size(project):
    make_folder(project / "images", per_class=4, sizes=(64,))
    prepared, manifest = prepare(data_params(project, source="imagefolder", root="images", val_fraction=0.25))
    assert prepared["train"][0].shape[1:] == (64, 64, 3)
    assert manifest["stored_size"] == {"side": 64, "chosen_by": "the images' own size (all of them are this size)"}


def mixed_image(size, mode, seed) -> Image.Image:
    """An image of `size` (width, height) in `mode`: a gradient plus noise, so that no mode is blank."""
    w, h = size
    rng = np.random.default_rng(seed)
    grey = (np.add.outer(np.arange(h) * 255 // max(h - 1, 1), np.arange(w) * 0) + rng.integers(0, 40, (h, w)))
    grey = grey.clip(0, 255).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)
    rgb = Image.fromarray(np.stack([grey, 255 - grey, grey // 2], axis=-1))
    return rgb.convert(mode) if mode != "P" else rgb.quantize(16)


def test_a_folder_of_any_sizes_and_modes_runs_with_the_defaults(project):
    shapes = [(7, 9), (32, 32), (500, 300), (64, 64)]
    modes = [("L", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("I;16", ".png")]
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            for i, (shape, (mode, ext)) in enumerate((shape, mode) for shape in shapes for mode in modes):
                path = project / "images" / split / c / f"{i}{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                mixed_image(shape, mode, i).save(path)
    set_params(project / "params.yaml", {"data.source": "imagefolder", "data.root": "images",
                                         "data.image_size": 48, "data.crop_pct": 0.75, "data.limit_per_class": None})
    prepared, manifest = prepare(params.load().data)  # stored_size: null, as in params.yaml
    assert manifest["stored_size"] == {"side": 64, "enlarged": 2 * 5 * 2 * 2,  # 7×9 and 32×32: 2 shapes, 5 modes, 2 classes, 2 splits
                                       "chosen_by": "data.image_size / data.crop_pct, since the images differ in size"}
    images = prepared["train"][0]
    assert images.shape == (40, 64, 64, 3) and manifest["splits"]["test"]["count"] == 40
    assert all(np.ptp(image) > 50 for image in images)  # no mode came out blank or clipped white (16-bit)


def test_a_non_square_image_is_resized_by_its_shorter_side_and_center_cropped_as_torchvision_does(tmp_path):
    from torchvision import transforms
    y, x = np.mgrid[0:375, 0:500]  # 500×375, a gradient across each axis
    photo = Image.fromarray(np.stack([x * 255 // 499, y * 255 // 374, x * 0 + 128], axis=-1).astype(np.uint8))
    ours = np.asarray(sources.resized_and_cropped(photo, 96)).astype(int)
    theirs = transforms.Compose([transforms.Resize(96, transforms.InterpolationMode.BICUBIC),
                                 transforms.CenterCrop(96)])(photo)
    assert ours.shape == (96, 96, 3) and np.abs(ours - np.asarray(theirs)).max() <= 1
    squashed = np.asarray(photo.resize((96, 96), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(ours - squashed).mean() > 5  # not squashed to a square


def test_no_validation_split_with_val_fraction_zero(project):
    prepared, manifest = prepare(data_params(project, val_fraction=0))
    assert manifest["splits"]["val"]["count"] == 0 and manifest["splits"]["train"]["count"] == 600
    assert prepared["val"][0].shape == (0, 32, 32, 3)


@needs_shared(CIFAR_JPEG)
def test_the_cifar10_jpeg_copy_as_an_image_folder(project, tmp_path):
    root = unpack_cifar_jpeg(tmp_path, per_class=30)
    _, manifest = prepare(data_params(project, source="imagefolder", root=str(root), limit_per_class=20,
                                           val_fraction=0.1))
    assert manifest["classes"][:3] == ["airplane", "automobile", "bird"] and len(manifest["classes"]) == 10
    assert {s: manifest["splits"][s]["count"] for s in arrays.SPLITS} == {"train": 180, "val": 20, "test": 200}


def test_an_image_folders_hash_reads_only_the_files_whose_size_or_time_changed(project):
    (project / ".dvc/tmp").mkdir(parents=True)
    make_folder(project / "images")
    first = check_inputs.folder_sha256(project / "images")
    image = project / "images/train/cat/0.jpg"
    seen = image.stat()
    with open(image, "r+b") as file:  # the same size, inode and time: not read again, as DVC would not
        file.write(b"\xff" * 4)
    os.utime(image, ns=(seen.st_atime_ns, seen.st_mtime_ns))
    assert check_inputs.folder_sha256(project / "images") == first
    os.utime(image, ns=(seen.st_atime_ns, seen.st_mtime_ns + 1000))
    touched = check_inputs.folder_sha256(project / "images")
    assert touched != first
    (project / "images/train/cat/new.png").write_bytes((project / "images/train/cat/1.JPEG").read_bytes())
    added = check_inputs.folder_sha256(project / "images")
    (project / "images/train/cat/new.png").unlink()
    assert len({first, touched, added}) == 3 and check_inputs.folder_sha256(project / "images") == touched


def test_a_temporary_copy_of_dvcs_queue_remembers_in_the_workspaces_dvc_tmp(project, tmp_path):
    workspace = tmp_path / "workspace"
    (workspace / ".dvc/tmp").mkdir(parents=True)
    (project / ".dvc").mkdir()
    assert check_inputs.memory_file("x.json") == Path(".dvc/tmp/x.json")  # the workspace itself
    # What DVC writes into the copy that runs a queued experiment
    (project / ".dvc/config.local").write_text(f"[cache]\n    dir = {workspace / '.dvc/cache'}\n")
    check_inputs.remember("x.json", {"checked": [1]})
    assert json.loads((workspace / ".dvc/tmp/x.json").read_text()) == {"checked": [1]}
    assert check_inputs.recalled("x.json") == {"checked": [1]} and not Path(".dvc/tmp/x.json").exists()
    (project / ".dvc/config.local").write_text("[cache]\n    dir = /shared/dvc-cache\n")  # a user's shared cache
    assert check_inputs.memory_file("x.json") == Path(".dvc/tmp/x.json")
