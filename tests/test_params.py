import re
import subprocess
import sys

import pytest
import yaml

from stages import check_inputs
from stages.pipeline import outputs, param_checks, params
from stages.study import protocols
from tests.conftest import FAST, set_params, stage


def test_the_committed_params_are_valid_and_are_the_notebook_protocol():
    p = param_checks.load("params.yaml")
    assert (p.model, p.strategy, p.data.source, p.data.image_size) == ("alexnet", "feature_extraction", "cifar10", 224)
    raw = yaml.safe_load(open("params.yaml"))
    assert protocols.protocol_of(raw) == "notebook" and protocols.differences(raw, "notebook") == []
    assert (p.train_heads.optimizer, p.train_heads.momentum, p.train_heads.batch_size, p.train_heads.epochs,
            p.train_heads.trainable) == ("sgd", 0.9, 32, 3, "last")
    assert (p.finetune.unfreeze, p.finetune.lr, p.finetune.backbone_lr) == ("all", 1e-3, 1e-3)
    assert (p.data.crop_pct, p.data.val_fraction, p.features.flip, p.finetune.flip) == (0.875, 0, False, False)


def test_every_protocol_sets_the_same_keys_and_each_is_valid(project):
    keys = {name: set(settings) for name, settings in protocols.PROTOCOLS.items()}
    assert keys["notebook"] == keys["readme"] == keys["best"]
    for name in protocols.PROTOCOLS:
        set_params(project / "params.yaml", protocols.overrides(name))
        assert protocols.protocol_of(yaml.safe_load((project / "params.yaml").read_text())) == name
        param_checks.load()


def test_checking_and_loading_import_no_model_registry(project):  # its time: python -m benchmarks.startup
    result = stage_in_fresh_python("import sys; from stages.pipeline import param_checks, params; param_checks.load(); "
                                   "params.load(); print(sorted({'torch', 'torchvision', 'timm'} & set(sys.modules)))")
    assert result.strip() == "[]"


def test_a_stage_reads_only_what_check_inputs_validated(project):
    assert params.load() == param_checks.load()  # the fixture recorded the copied params.yaml as check-inputs does
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("seed: 0", "seed: 0  # a comment changes no content", 1))
    assert params.load().seed == 0
    (project / "params.yaml").write_text(text.replace("lr: 1.0e-3", "lr: -1", 1))
    with pytest.raises(params.ParamError, match="^params.yaml is not what check-inputs validated last: run python -m "
                       "stages.check_inputs first"):
        params.load()
    (project / outputs.CHECKED_PARAMS).unlink()
    (project / "params.yaml").write_text(text)
    with pytest.raises(params.ParamError, match="is not what check-inputs validated last"):
        params.load()


def stage_in_fresh_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("changes, message", [
    ({"data.source": "cifar11"}, "data.source must be one of cifar10, cifar100, imagefolder, synthetic"),
    ({"data.val_fraction": 1.5}, "data.val_fraction must be in [0, 1)"),
    ({"data.crop_pct": 0}, "data.crop_pct must be in (0, 1]"),
    ({"data.source": "imagefolder", "data.root": "no/such/folder"}, "data.root must hold train/<class>/"),
    ({"data.image_size": "big"}, "data.image_size must be an integer"),
    ({"data.stored_size": 64}, "data.stored_size must be null or 32 for CIFAR"),
    ({"train_heads.epochs": 2.5}, "train_heads.epochs must be an integer"),
    ({"train_heads.optimizer": "lbfgs"}, "train_heads.optimizer must be one of sgd, adam, adamw"),
    ({"train_heads.trainable": "fc7"}, "train_heads.trainable must be one of last, classifier"),
    ({"finetune.nesterov": True, "finetune.optimizer": "adam"}, "finetune.nesterov needs optimizer sgd"),
    ({"finetune.momentum": 1.0}, "finetune.momentum must be in [0, 1)"),
    ({"finetune.crop_padding": 32}, "finetune.crop_padding must be below the stored image size, 32 px"),
    ({"train_heads.patience": 2}, "train_heads.patience needs a validation split"),
    ({"features.flip": "yes"}, "features.flip must be true or false"),
    ({"finetune.unfreeze": -1}, "finetune.unfreeze must be a number of blocks"),
    ({"finetune.unfreeze": "some"}, "finetune.unfreeze must be an integer or one of all"),
    ({"finetune.warmup_epochs": 3}, "finetune.warmup_epochs must be in [0, finetune.epochs)"),
    ({"weights": "missing.pth"}, "weights must be imagenet, none, the path of an existing state_dict file, or a folder"),
    ({"weights": "stages"}, "weights holds 0 files for model alexnet (none): it needs one, named alexnet.pth"),
    ({"strategy": "finetuning"}, "strategy must be one of feature_extraction, finetune, lp_ft"),
    ({"strategy": "lp_ft", "weights": "none"}, "strategy lp_ft fine-tunes from a probe of pretrained features"),
    ({"strategy": "lp_ft", "train_heads.probe_layer": "fc6"}, "train_heads.probe_layer must be penultimate with strategy lp_ft"),
    ({"data.limit_per_class": 0}, "data.limit_per_class must be a positive integer or null"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"finetune.label_smoothing": 1.0}, "finetune.label_smoothing must be in [0, 1)"),
    ({"train_heads.solver": "newton"}, "train_heads.solver must be one of minibatch, lbfgs"),
    ({"evaluate.flip": "both"}, "evaluate.flip must be true or false"),
])
def test_a_bad_value_names_its_key_and_how_to_restore_the_file(project, changes, message):
    set_params(project / "params.yaml", changes)
    with pytest.raises(params.ParamError, match="^params.yaml: " + re.escape(message)) as raised:
        param_checks.load()
    assert str(raised.value).endswith("git checkout params.yaml restores the committed values)")


@pytest.mark.parametrize("model", ["alexnot", "timm/no_such_net"])
def test_an_unknown_model_is_caught_by_check_inputs(project, model):
    set_params(project / "params.yaml", {"model": model})
    with pytest.raises(params.ParamError, match="model is not a torchvision classification model"):
        check_inputs.check_model_name(param_checks.load().model)


def test_unknown_and_missing_keys_are_named(project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  flip: false   ", "  flipp: false   ", 1))
    with pytest.raises(params.ParamError, match="unknown key features.flipp"):
        param_checks.load()
    (project / "params.yaml").write_text(re.sub(r"(?m)^seed: .*$", "", text))
    with pytest.raises(params.ParamError, match="missing key seed"):
        param_checks.load()


def test_numbers_in_e_notation_are_read_as_floats(project):
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("lr: 1.0e-3", "lr: 3e-4", 1))
    assert param_checks.load().train_heads.lr == 3e-4
    params.record_checked(params.read())
    assert params.load().train_heads.lr == 3e-4


def test_a_stage_reports_a_bad_value_in_one_line_and_keeps_earlier_outputs(project):
    set_params(project / "params.yaml", FAST)
    stage("prepare_data")
    before = (project / "data/prepared/train_images.npy").read_bytes()
    for bad in ({"data.source": "cifar11"}, {"data.val_fraction": 1.5}, {"model": "alexnot"},
                {"data.source": "imagefolder", "data.root": "nowhere"}):
        set_params(project / "params.yaml", {**FAST, **bad})
        for name in ("check_inputs", "prepare_data"):
            result = stage(name, check=False)
            if name == "prepare_data" and "model" in bad:
                continue  # the model's name is check-inputs' to check; prepare-data never reads it
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith("error: params.yaml: " if name == "check_inputs" else
                                            "error: params.yaml is not what check-inputs validated last")
            assert result.stderr.count("\n") == 1
            assert "Traceback" not in result.stderr
    assert (project / "data/prepared/train_images.npy").read_bytes() == before


def test_a_folder_of_weights_gives_each_model_its_own_file(project):
    folder = project / "weights"
    folder.mkdir()
    for name in ("tf_efficientnet_lite0.in1k.pth", "tf_efficientnet_lite2.in1k.pth", "resnet18.pth", "notes.txt"):
        (folder / name).write_bytes(b"")
    (folder / "resnet18.old.pth").mkdir()  # a folder with a weights file's name is not one
    for model, file in (("timm/tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k.pth"),
                        ("timm/tf_efficientnet_lite2", "tf_efficientnet_lite2.in1k.pth"), ("resnet18", "resnet18.pth")):
        set_params(project / "params.yaml", {"weights": str(folder), "model": model})
        assert params.load().model_weights == str(folder / file)
    (folder / "resnet18.a1.pth").write_bytes(b"")
    with pytest.raises(params.ParamError, match="holds 2 files for model resnet18"):
        param_checks.load()
    with pytest.raises(params.ParamError, match="holds 2 files for model resnet18"):
        params.load().model_weights  # a stage run by hand after the folder changed
