import re

import pytest

from stages import params
from tests.conftest import FAST, set_params, stage


def test_the_committed_params_are_valid():
    p = params.load("params.yaml")
    assert (p.model, p.strategy, p.data.source, p.train_heads.lr, p.train_heads.epochs) == (
        "alexnet", "feature_extraction", "cifar10", 1e-3, 20)


@pytest.mark.parametrize("changes, message", [
    ({"data.source": "cifar11"}, "data.source must be one of cifar10, cifar100, imagefolder, synthetic"),
    ({"data.val_fraction": 1.5}, "data.val_fraction must be in (0, 1)"),
    ({"data.source": "imagefolder", "data.root": "no/such/folder"}, "data.root must hold train/<class>/"),
    ({"data.image_size": "big"}, "data.image_size must be an integer"),
    ({"train_heads.epochs": 2.5}, "train_heads.epochs must be an integer"),
    ({"features.flip": "yes"}, "features.flip must be true or false"),
    ({"finetune.unfreeze": -1}, "finetune.unfreeze must be a number of blocks"),
    ({"finetune.unfreeze": "some"}, "finetune.unfreeze must be an integer or one of all"),
    ({"finetune.warmup_epochs": 20}, "finetune.warmup_epochs must be in [0, finetune.epochs)"),
    ({"model": "alexnot"}, "model is not a torchvision classification model"),
    ({"model": "timm/no_such_net"}, "model is not a torchvision"),
    ({"weights": "missing.pth"}, "weights must be imagenet, none, or the path of an existing"),
    ({"strategy": "finetuning"}, "strategy must be one of feature_extraction, finetune"),
    ({"data.limit_per_class": 0}, "data.limit_per_class must be a positive integer or null"),
])
def test_a_bad_value_names_its_key(project, changes, message):
    set_params(project / "params.yaml", changes)
    with pytest.raises(params.ParamError, match="^params.yaml: " + re.escape(message)):
        params.load()


def test_unknown_and_missing_keys_are_named(project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  flip: true   ", "  flipp: true   ", 1))
    with pytest.raises(params.ParamError, match="unknown key features.flipp"):
        params.load()
    (project / "params.yaml").write_text(text.replace("seed: 0", ""))
    with pytest.raises(params.ParamError, match="missing key seed"):
        params.load()


def test_numbers_in_e_notation_are_read_as_floats(project):
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("lr: 1.0e-3", "lr: 3e-4"))
    assert params.load().train_heads.lr == 3e-4


def test_a_stage_reports_a_bad_value_in_one_line_and_keeps_earlier_outputs(project):
    set_params(project / "params.yaml", FAST)
    stage("prepare_data")
    before = (project / "data/prepared/train_images.npy").read_bytes()
    for bad in ({"data.source": "cifar11"}, {"data.val_fraction": 1.5},
                {"data.source": "imagefolder", "data.root": "nowhere"}):
        set_params(project / "params.yaml", {**FAST, **bad})
        for name in ("params", "prepare_data"):
            result = stage(name, check=False)
            assert result.returncode == 2
            assert result.stderr.startswith("error: params.yaml: ") and result.stderr.count("\n") == 1
            assert "Traceback" not in result.stderr
    assert (project / "data/prepared/train_images.npy").read_bytes() == before
