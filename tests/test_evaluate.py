"""evaluate: feature extraction scored on the cached test features, checked against the whole model.

The stages run in this process (the fast tier): check-inputs, prepare-data, cache-features and train-heads once
for the module, then each test on its own copy of the outputs.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import cache_features, check_inputs, evaluate, prepare_data, train_heads
from stages.data import arrays, inputs
from stages.model import backbones, devices, hardware, inference
from stages.pipeline import outputs, params, trained
from stages.pipeline.errors import UserError
from tests.conftest import CHANCE, REPO, set_params

# Learnable in seconds: a random resnet18's features at 32 px, an Adam-trained Linear on them, flips on both sides
SETUP = {"data.source": "synthetic", "data.synthetic.train_per_class": 30, "data.synthetic.test_per_class": 20,
         "model": "resnet18", "weights": "none", "data.image_size": 32,
         "data.val_fraction": 0.1, "train_heads.optimizer": "adam", "train_heads.epochs": 6,
         "features.flip": True, "evaluate.flip": True}
FIX = "run dvc repro -f cache-features"


@pytest.fixture(scope="module")
def cached_cells(tmp_path_factory):
    """A feature-extraction cell's outputs up to train-heads, per cpu_bf16 value, made once when first asked for."""
    folders = {}

    def made(bf16) -> Path:
        if bf16 not in folders:
            folder = tmp_path_factory.mktemp(f"cell_bf16_{bf16}")
            shutil.copy(REPO / "params.yaml", folder / "params.yaml")
            set_params(folder / "params.yaml", {**SETUP, "cpu_bf16": bf16})
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(folder)
                for stage in (check_inputs, prepare_data, cache_features, train_heads):
                    stage.main()
            folders[bf16] = folder
        return folders[bf16]
    return made


@pytest.fixture
def cell(request, cached_cells, tmp_path, monkeypatch):
    """A copy of the module's cell (params.yaml's cpu_bf16, or the test's parameter), as the cwd."""
    shutil.copytree(cached_cells(getattr(request, "param", "auto")), tmp_path / "cell")
    monkeypatch.chdir(tmp_path / "cell")
    return tmp_path / "cell"


def full_model_accuracy() -> float:
    """Test accuracy of the whole model run on every test image (and its mirror image): what evaluate
    computed for feature extraction before it read the cache."""
    p = params.load()
    device = devices.setup(p.device)
    images, labels = arrays.open_split(outputs.PREPARED, "test")
    network = backbones.build(p.model, p.weights, arrays.num_classes(outputs.PREPARED), p.data.image_size)
    trained.load_into(network, p.strategy)
    model = devices.place(network.model, device)
    preprocess = network.preprocess.at(p.data.image_size, p.data.crop_pct)
    logits = sum(inference.predict(model, inputs.image_inputs(images, preprocess, 64, device, flip), device,
                                   hardware.bf16_on_cpu(p.cpu_bf16)) for flip in (False, True))
    return inference.loss_and_accuracy(logits, torch.from_numpy(labels))[1]


@pytest.mark.parametrize("cell", [False, "auto"], ids=["float32", "bf16_if_native"], indirect=True)
def test_the_cached_path_gives_the_whole_models_test_accuracy(cell):
    evaluate.main()
    metrics = outputs.read_json(outputs.METRICS)
    assert metrics["test"]["accuracy"] > 2 * CHANCE
    assert metrics["test"]["accuracy"] == pytest.approx(full_model_accuracy(), abs=1e-6)
    # float32's body against its fp16 cache may flip a near-tie in one mirror view: the averaged accuracy is equal
    assert metrics["cache_check"]["images"] == 200 and metrics["cache_check"]["prediction_agreement"] >= 0.99
    parts = [outputs.read_json(outputs.FEATURE_METRICS)["time_s"], trained.time_s("feature_extraction"),
             metrics["evaluate_time_s"]]
    assert metrics["evaluate_time_s"] > 0 and metrics["total_time_s"] == round(sum(parts), 2)


def test_the_check_sample_is_fixed_and_spread_over_the_test_split():
    assert np.array_equal(evaluate.check_sample(1000), evaluate.check_sample(1000))
    assert len(evaluate.check_sample(1000)) == evaluate.CHECK_IMAGES and evaluate.check_sample(1000)[-1] == 999
    assert np.array_equal(evaluate.check_sample(100), np.arange(100))


@pytest.mark.parametrize("stale, message", [
    (lambda x: np.roll(x, len(x) // 10, axis=0), "agrees with the full model on only"),  # other images, same count
    (lambda x: x[:-1], "holds 199 feature vectors of 512 values, but there are 200 test images"),
    (lambda x: np.concatenate([x, x], axis=1), "the head reads 512 values"),  # another backbone's width
])
def test_a_stale_feature_cache_is_one_line_naming_the_fix(cell, stale, message):
    for name in ("test.npy", "test_flip.npy"):
        path = outputs.FEATURES / name
        array = stale(np.load(path))
        path.unlink()  # a new file, never written through a link into DVC's cache
        np.save(path, array)
    with pytest.raises(UserError, match=message) as error:
        evaluate.main()
    assert FIX in str(error.value) and "\n" not in str(error.value)
    assert not outputs.METRICS.exists()


def test_a_stale_flipped_cache_alone_is_caught(cell):
    path = outputs.FEATURES / "test_flip.npy"
    array = np.load(path)[::-1].copy()  # the mirror images' features of other test images
    path.unlink()
    np.save(path, array)
    with pytest.raises(UserError, match="agrees with the full model on only"):
        evaluate.main()


def test_a_cache_without_flipped_test_features_is_refused_when_evaluate_flip_asks_for_them(cell):
    (outputs.FEATURES / "test_flip.npy").unlink()
    with pytest.raises(UserError) as error:
        evaluate.main()
    assert str(error.value) == ("data/features/test_flip.npy is missing, so the feature cache predates "
                                f"evaluate.flip: true: {FIX}")
    set_params(cell / "params.yaml", {"evaluate.flip": False})  # without the flip, the cache serves
    evaluate.main()
    assert outputs.read_json(outputs.METRICS)["cache_check"]["prediction_agreement"] == 1


def test_cache_features_writes_flipped_test_features_only_when_evaluate_flip_asks(cell):
    set_params(cell / "params.yaml", {"evaluate.flip": False, "features.flip": False})
    cache_features.main()
    assert sorted(p.name for p in outputs.FEATURES.glob("*.npy")) == ["test.npy", "train.npy", "val.npy"]


def test_train_heads_builds_no_backbone_for_a_lone_linear_head(cell):
    assert outputs.read_json(outputs.FEATURES / "manifest.json")["head_is_linear"]  # resnet18's head: one new Linear
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "build", lambda *args, **kwargs: pytest.fail("train-heads built the backbone"))
        train_heads.main()
    evaluate.main()  # the Linear trained alone loads into the whole model's head
    assert outputs.read_json(outputs.METRICS)["test"]["accuracy"] > 2 * CHANCE
