"""params.yaml as frozen dataclasses, for the stages.

check-inputs, which dvc repro runs before every other stage, validates params.yaml
(stages/pipeline/param_checks.py: types and limits) and records the content it validated; `load()`
gives a stage that content, and refuses in one line a params.yaml changed since, as when a stage
is run by hand after an edit. What each setting means is said once, in params.yaml's comments.
"""
import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import yaml

from stages.pipeline import outputs
from stages.pipeline.errors import UserError

PARAMS_FILE = "params.yaml"
WEIGHTS_SUFFIXES = (".pth", ".pt", ".safetensors")
RESTORE_HINT = "git checkout params.yaml restores the committed values"


class ParamError(UserError):
    """A mistake in params.yaml. `problem`: the line without the hint to restore the file, for the
    study, whose cells come from -S values rather than an edited params.yaml."""
    def __init__(self, problem: str, value=None, restore_hint: bool = False):
        self.problem = problem if value is None else f"{problem} (got {value!r})"
        super().__init__(f"{problem} (got {value!r}; {RESTORE_HINT})" if restore_hint else self.problem)


@dataclass(frozen=True)
class SyntheticParams:
    classes: int
    train_per_class: int
    test_per_class: int


@dataclass(frozen=True)
class DataParams:
    source: Literal["cifar10", "cifar100", "imagefolder", "synthetic"]
    root: str
    split_seed: int
    image_size: int
    crop_pct: float
    val_fraction: float
    limit_per_class: Union[int, None]
    train_per_class: Union[int, None]
    stored_size: Union[int, None]
    skip_unreadable: bool
    max_image_pixels: int
    synthetic: SyntheticParams

    @property
    def has_validation(self) -> bool:
        """A validation split exists: carved from train, or the image folder's own val/."""
        return self.val_fraction > 0 or (self.source == "imagefolder" and Path(self.root, "val").is_dir())


@dataclass(frozen=True)
class FeatureParams:
    batch_size: int
    flip: bool


@dataclass(frozen=True)
class TrainParams:
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    epochs: int
    min_steps: int
    batch_size: int
    schedule: Literal["constant", "cosine"]
    warmup_epochs: int
    patience: Union[int, None]
    label_smoothing: float

    def steps_per_epoch(self, n_train: int) -> int:
        """A pass over the training images, or an equal share of min_steps if that is more: few
        images then get as many steps as many do (BiT-HyperRule's fixed step count for small data)."""
        return max(self.steps_per_pass(n_train), math.ceil(self.min_steps / self.epochs))

    def steps_per_pass(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)


@dataclass(frozen=True)
class HeadParams(TrainParams):
    trainable: Literal["last", "classifier"]
    solver: Literal["minibatch", "lbfgs"]
    probe_layer: Literal["penultimate", "fc6", "body"]


@dataclass(frozen=True)
class FinetuneParams(TrainParams):
    unfreeze: Union[int, Literal["all"]]
    backbone_lr: float
    flip: bool
    crop_padding: int
    freeze_norm_stats: bool
    processes: int
    drop_last: bool
    checkpoint_interval_s: float

    def steps_per_pass(self, n_train: int) -> int:
        return n_train // self.batch_size if self.drop_last else super().steps_per_pass(n_train)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    flip: bool


@dataclass(frozen=True)
class Params:
    seed: int
    model: str
    weights: str
    strategy: Literal["feature_extraction", "finetune", "lp_ft"]
    device: Literal["auto", "cpu", "cuda"]
    cpu_bf16: Literal["auto", False]
    compile: bool
    data: DataParams
    features: FeatureParams
    train_heads: HeadParams
    finetune: FinetuneParams
    evaluate: EvaluateParams

    @property
    def model_weights(self) -> str:
        """`weights`, or for a folder the one file in it named after the model (timm/ left out):
        <name>.pth, or <name>.<anything>.pth (.pt, .safetensors), such as tf_efficientnet_lite0.in1k.pth."""
        folder = Path(self.weights)
        if self.weights in ("imagenet", "none") or not folder.is_dir():
            return self.weights
        name = self.model.removeprefix("timm/")
        found = sorted(str(f) for f in folder.iterdir() if f.name.endswith(WEIGHTS_SUFFIXES)
                       and f.name.startswith(name + ".") and f.is_file())
        require(len(found) == 1, "weights", f"holds {len(found)} files for model {self.model} ({', '.join(found) or 'none'}): "
                 f"it needs one, named {name}.pth (or {name}.<tag>.pth)", self.weights)
        return found[0]

    @property
    def probes(self) -> bool:
        """The strategy trains a probe on cached features: feature extraction, and lp_ft before fine-tuning."""
        return self.strategy in ("feature_extraction", "lp_ft")

    @property
    def finetunes(self) -> bool:
        return self.strategy in ("finetune", "lp_ft")


def read(path=PARAMS_FILE) -> dict:
    """params.yaml's content, as YAML reads it."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ParamError(f"{path} not found: run from the project's root") from None
    except yaml.YAMLError as error:
        raise ParamError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None


def load(path=PARAMS_FILE) -> Params:
    """The stages' params: the content that check-inputs validated last (record_checked)."""
    raw, record = read(path), Path(path).parent / outputs.CHECKED_PARAMS
    recorded = outputs.read_json(record) if record.exists() else {}
    if recorded.get("sha256") != content_digest(raw):
        raise ParamError(f"{path} is not what check-inputs validated last: run python -m stages.check_inputs "
                         "first (dvc repro does)")
    return typed(Params, raw)


def record_checked(raw: dict, path=PARAMS_FILE) -> None:
    """check-inputs' record that `raw`, the content of `path`, passed every check."""
    outputs.write_json(Path(path).parent / outputs.CHECKED_PARAMS, {"sha256": content_digest(raw)})


def content_digest(raw: dict) -> str:
    """Of the content, not the text: an edited comment needs no new check."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def typed(cls, raw: dict):
    """Dataclass `cls` from validated content: its sections built, float settings as floats."""
    hints = typing.get_type_hints(cls)
    return cls(**{name: typed(hints[name], value) if dataclasses.is_dataclass(hints[name])
                  else float(value) if hints[name] is float else value for name, value in raw.items()})


def resize_side(size: int, crop_pct: float) -> int:
    return math.floor(size / crop_pct)  # timm's rule; 224 / 0.875 = 256


def check_crop_padding(padding: int, stored: int) -> None:
    require(padding < stored, "finetune.crop_padding", f"must be below the stored image size, {stored} px", padding)


def require(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ParamError(f"params.yaml: {key} {rule}", value, restore_hint=True)


