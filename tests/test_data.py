import pickle
from urllib.error import URLError

import numpy as np
import pytest
from PIL import Image

from stages import data, params, prepare_data
from tests.conftest import CIFAR_JPEG, FAST, needs_shared, set_params, unpack_cifar_jpeg


def data_params(project, **changes) -> params.DataParams:
    set_params(project / "params.yaml", {**FAST, **{f"data.{k}": v for k, v in changes.items()}})
    return params.load().data


def test_synthetic_source_is_seeded_balanced_and_split(project):
    arrays, manifest = data.prepare(data_params(project, val_fraction=0.1))
    again, _ = data.prepare(data_params(project, val_fraction=0.1))
    other, _ = data.prepare(data_params(project, val_fraction=0.1, split_seed=1))
    assert all(np.array_equal(arrays[s][0], again[s][0]) for s in data.SPLITS)
    assert not np.array_equal(arrays["train"][0], other["train"][0])
    assert manifest["splits"]["train"]["count"] == 540 and manifest["splits"]["val"]["count"] == 60
    assert set(manifest["splits"]["val"]["per_class"].values()) == {6}
    assert manifest["splits"]["test"]["count"] == 300
    assert arrays["train"][0].shape == (540, 32, 32, 3) and arrays["train"][0].dtype == np.uint8


def test_synthetic_classes_differ_but_overlap(project):
    """A nearest-class-mean classifier on raw pixels beats chance, but is far from perfect."""
    arrays, _ = data.prepare(data_params(project))
    (train, train_y), (test, test_y) = arrays["train"], arrays["test"]
    means = np.stack([train[train_y == c].reshape(-1, 32 * 32 * 3).mean(0) for c in range(10)])
    distances = ((test.reshape(len(test), -1)[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == test_y).mean()
    assert 0.2 < accuracy < 0.9


def test_cap_per_class_takes_the_first_n_in_a_seeded_order():
    labels = np.repeat(np.arange(3), 10)
    chosen = data.cap_per_class(labels, 4, data.rng(0, "x"))
    assert np.bincount(labels[chosen]).tolist() == [4, 4, 4] and np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, data.cap_per_class(labels, 4, data.rng(0, "x")))
    assert not np.array_equal(chosen, data.cap_per_class(labels, 4, data.rng(1, "x")))
    more = data.cap_per_class(labels, 6, data.rng(0, "x"))
    assert set(chosen) <= set(more)


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
def test_cifar_batches_are_read_channel_last(project, source, folder, label_key, n_classes):
    classes = [f"c{i}" for i in range(n_classes)]
    first = write_cifar_batches(project / "data/raw" / folder, label_key, classes)
    src = data.open_source(data_params(project, source=source))
    batch = pickle.loads(first.read_bytes())
    images, kept = src.splits["train"].load(np.arange(3))
    assert src.classes == classes and images.shape == (3, 32, 32, 3)
    assert np.array_equal(images[1, :, :, 0].ravel(), batch["data"][1, :1024])  # red plane first
    assert np.array_equal(images[1, 0, 0], batch["data"][1, [0, 1024, 2048]])
    assert src.splits["train"].labels[:20].tolist() == batch[label_key]
    assert len(src.splits["test"].labels) == 20


def test_cifar_offline_without_the_archive_says_where_to_put_it(project, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr("torchvision.datasets.utils.urllib.request.urlopen", offline)
    with pytest.raises(data.DataError, match=r"put it in data/raw/ .* data.source=imagefolder or synthetic"):
        data.open_source(data_params(project, source="cifar10"))


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
    arrays, manifest = data.prepare(folder_params(project, val_fraction=0.2))
    assert manifest["classes"] == ["cat", "dog"]
    assert {s: manifest["splits"][s]["count"] for s in data.SPLITS} == {"train": 16, "val": 4, "test": 20}
    images, labels = arrays["test"]
    assert images.shape == (20, 32, 32, 3)
    assert images[labels == 0][:, :, :, 0].mean() > 150 and images[labels == 1][:, :, :, 2].mean() > 150


def test_imagefolder_uses_its_own_val_split(project):
    make_folder(project / "images", splits=("train", "val", "test"))
    _, manifest = data.prepare(folder_params(project))
    assert {s: manifest["splits"][s]["count"] for s in data.SPLITS} == {"train": 8, "val": 8, "test": 8}


def test_imagefolder_splits_must_have_the_same_classes(project):
    make_folder(project / "images")
    write_image(project / "images/test/bird/0.png", 32, (0, 200, 0))
    with pytest.raises(data.DataError, match="has classes .*bird.*every split needs the same class folders"):
        data.prepare(folder_params(project))


def test_an_unreadable_image_is_named_or_skipped_and_counted(project):
    make_folder(project / "images")
    (project / "images/train/dog/broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(data.DataError, match=r"cannot read .*broken.jpg .*data.skip_unreadable: true"):
        data.prepare(folder_params(project))
    _, manifest = data.prepare(folder_params(project, skip_unreadable=True,
                                                  val_fraction=0.25))
    assert manifest["skipped_unreadable"] == {"train": 1, "test": 0}
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 8


def test_an_empty_split_is_an_error(project):
    make_folder(project / "images", per_class=2)
    with pytest.raises(data.DataError, match="the val split is empty"):
        data.prepare(folder_params(project, val_fraction=0.1))


def test_a_folder_of_one_size_is_stored_at_that_size_and_mixed_sizes_need_the_param(project):
    make_folder(project / "images", per_class=4, sizes=(64,))
    arrays, manifest = data.prepare(data_params(project, source="imagefolder", root="images", val_fraction=0.25))
    assert arrays["train"][0].shape[1:] == (64, 64, 3)
    assert manifest["stored_size"] == {"side": 64, "chosen_by": "the image folder (all its images are this size)"}
    make_folder(project / "mixed", per_class=4, sizes=(32, 48))
    with pytest.raises(data.DataError, match=r"not all one square size \(32×32, 48×48\): set data.stored_size"):
        data.prepare(data_params(project, source="imagefolder", root="mixed", val_fraction=0.25))


def test_no_validation_split_with_val_fraction_zero(project):
    arrays, manifest = data.prepare(data_params(project, val_fraction=0))
    assert manifest["splits"]["val"]["count"] == 0 and manifest["splits"]["train"]["count"] == 600
    assert arrays["val"][0].shape == (0, 32, 32, 3)


@needs_shared(CIFAR_JPEG)
def test_the_cifar10_jpeg_copy_as_an_image_folder(project, tmp_path):
    root = unpack_cifar_jpeg(tmp_path, per_class=30)
    _, manifest = data.prepare(data_params(project, source="imagefolder", root=str(root), limit_per_class=20,
                                           val_fraction=0.1))
    assert manifest["classes"][:3] == ["airplane", "automobile", "bird"] and len(manifest["classes"]) == 10
    assert {s: manifest["splits"][s]["count"] for s in data.SPLITS} == {"train": 180, "val": 20, "test": 200}
