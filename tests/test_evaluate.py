"""evaluate: feature extraction scored on the cached test features, as the whole model scores it.

The stages run in this process (the fast tier): check-inputs, prepare-data, cache-features and train-heads once
for the module, then each test on its own copy of the outputs.
"""
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages import cache_features, check_inputs, evaluate, prepare_data, train_heads
from stages.model import backbones
from stages.pipeline import outputs, trained
from stages.pipeline.errors import UserError
from tests.conftest import CHANCE, REPO, full_model_accuracy, set_params

# Learnable in seconds: a random resnet18's features at 32 px, an Adam-trained Linear on them, flips on both sides
SETUP = {"data.source": "synthetic", "data.synthetic.train_per_class": 30, "data.synthetic.test_per_class": 20,
         "model": "resnet18", "weights": "none", "data.image_size": 32,
         "data.val_fraction": 0.1, "train_heads.optimizer": "adam", "train_heads.epochs": 6,
         "features.flip": True, "evaluate.flip": True}
FIX = "run dvc repro -f cache-features"
STALE = "so it may not come from this backbone and these images: run dvc repro cache-features"


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


@pytest.mark.parametrize("cell", [False, "auto"], ids=["float32", "bf16_if_native"], indirect=True)
def test_the_cached_path_gives_the_whole_models_test_accuracy_and_builds_no_backbone(cell):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "build", lambda *args, **kwargs: pytest.fail("evaluate built the backbone"))
        evaluate.main()
    metrics = outputs.read_json(outputs.METRICS)
    assert metrics["test"]["accuracy"] > 2 * CHANCE
    # float32's body against its fp16 cache may flip a near-tie in one mirror view: the averaged accuracy is equal
    assert metrics["test"]["accuracy"] == pytest.approx(full_model_accuracy(), abs=1e-6)
    parts = [outputs.read_json(outputs.FEATURE_METRICS)["time_s"], trained.time_s("feature_extraction"),
             metrics["evaluate_time_s"]]
    assert metrics["evaluate_time_s"] > 0 and metrics["total_time_s"] == round(sum(parts), 2)


@pytest.mark.parametrize("change, named", [
    ({"data.crop_pct": 1.0}, "data.crop_pct"),  # the same backbone, other inputs: a sample could agree
    ({"model": "resnet34"}, "model"),
    ({"evaluate.flip": False}, "evaluate.flip"),  # DVC reruns cache-features for it, so a cache is made for one value
])
def test_a_feature_cache_made_under_other_params_is_one_line_naming_them(cell, change, named):
    set_params(cell / "params.yaml", change)
    with pytest.raises(UserError, match=f"\\({named} changed since\\)") as error:
        evaluate.main()
    assert STALE in str(error.value) and "\n" not in str(error.value)
    assert not outputs.METRICS.exists()


def test_a_feature_cache_of_other_images_is_refused(cell):
    set_params(cell / "params.yaml", {"data.split_seed": 1})
    prepare_data.main()  # the same counts, other images in each split
    with pytest.raises(UserError, match="data/prepared changed since") as error:
        evaluate.main()
    assert STALE in str(error.value)


@pytest.mark.parametrize("stale, message", [
    (lambda x: x[:-1], "holds 199 feature vectors of 512 values, but there are 200 test images"),  # a hand edit
    (lambda x: np.concatenate([x, x], axis=1), "the head reads 512 values"),  # another backbone's width
])
def test_a_feature_file_edited_by_hand_is_one_line_naming_the_fix(cell, stale, message):
    for name in ("test.npy", "test_flip.npy"):
        path = outputs.FEATURES / name
        array = stale(np.load(path))
        path.unlink()  # a new file, never written through a link into DVC's cache
        np.save(path, array)
    with pytest.raises(UserError, match=message) as error:
        evaluate.main()
    assert FIX in str(error.value) and "\n" not in str(error.value)
    assert not outputs.METRICS.exists()


def test_a_cache_without_flipped_test_features_is_refused_when_evaluate_flip_asks_for_them(cell):
    (outputs.FEATURES / "test_flip.npy").unlink()
    with pytest.raises(UserError) as error:
        evaluate.main()
    assert str(error.value) == ("data/features/test_flip.npy is missing (removed since cache-features wrote the "
                                f"cache): {FIX}")


def test_cache_features_writes_flipped_test_features_only_when_evaluate_flip_asks(cell):
    set_params(cell / "params.yaml", {"evaluate.flip": False, "features.flip": False})
    cache_features.main()
    assert sorted(p.name for p in outputs.FEATURES.glob("*.npy")) == ["test.npy", "train.npy", "val.npy"]


def test_train_heads_builds_no_backbone_for_a_lone_linear_head(cell):
    assert outputs.read_json(outputs.FEATURES / "manifest.json")["head_is_linear"]  # resnet18's head: one new Linear
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backbones, "build", lambda *args, **kwargs: pytest.fail("train-heads built the backbone"))
        train_heads.main()
    evaluate.main()
    assert outputs.read_json(outputs.METRICS)["test"]["accuracy"] == pytest.approx(full_model_accuracy(), abs=1e-6)
