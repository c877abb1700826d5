"""params.yaml, loaded once and validated into frozen dataclasses.

Every stage calls `load()` first, so a wrong key, type or value stops it with a one-line
error before it touches an output; the check-inputs stage runs the same validation ahead of
every other stage, so that `dvc repro` stops before DVC deletes any stage's outputs.
`load()` is quick: it imports no model registry (check_inputs checks the model's name).
What each setting means is said once, in params.yaml's comments; here are their types and limits.
"""
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Union

import yaml

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

    def __post_init__(self):
        _require(self.split_seed >= 0, "data.split_seed", "must be >= 0", self.split_seed)
        _require(self.image_size >= 16, "data.image_size", "must be at least 16", self.image_size)
        _require(0 < self.crop_pct <= 1, "data.crop_pct", "must be in (0, 1]", self.crop_pct)
        _require(0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)", self.val_fraction)
        _require(self.limit_per_class is None or self.limit_per_class > 0,
                 "data.limit_per_class", "must be a positive integer or null", self.limit_per_class)
        _require(self.train_per_class is None or self.train_per_class > 0, "data.train_per_class",
                 "must be a positive integer or null (every training image)", self.train_per_class)
        _require(self.stored_size is None or self.stored_size >= 8, "data.stored_size",
                 "must be at least 8, or null", self.stored_size)
        _require(self.stored_size in (None, 32) or not self.source.startswith("cifar"), "data.stored_size",
                 "must be null or 32 for CIFAR, whose images are 32 px", self.stored_size)
        _require(self.max_image_pixels > 0, "data.max_image_pixels", "must be positive", self.max_image_pixels)
        _require(self.synthetic.classes >= 2, "data.synthetic.classes", "must be at least 2", self.synthetic.classes)
        for key in ("train_per_class", "test_per_class"):
            value = getattr(self.synthetic, key)
            _require(value > 0, f"data.synthetic.{key}", "must be positive", value)
        if self.source == "imagefolder":
            for split in ("train", "test"):
                _require(Path(self.root, split).is_dir(), "data.root",
                         f"must hold {split}/<class>/ image folders; set it to your image folder's root",
                         self.root)

    @property
    def has_validation(self) -> bool:
        """A validation split exists: carved from train, or the image folder's own val/."""
        return self.val_fraction > 0 or (self.source == "imagefolder" and Path(self.root, "val").is_dir())


@dataclass(frozen=True)
class FeatureParams:
    batch_size: int
    flip: bool

    def __post_init__(self):
        _require(self.batch_size > 0, "features.batch_size", "must be positive", self.batch_size)


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

    @property
    def section(self) -> str:
        return "finetune" if isinstance(self, FinetuneParams) else "train_heads"

    def steps_per_epoch(self, n_train: int) -> int:
        """A pass over the training images, or an equal share of min_steps if that is more: few
        images then get as many steps as many do (BiT-HyperRule's fixed step count for small data)."""
        return max(self.steps_per_pass(n_train), math.ceil(self.min_steps / self.epochs))

    def steps_per_pass(self, n_train: int) -> int:
        return math.ceil(n_train / self.batch_size)

    def __post_init__(self):
        section = self.section
        _require(self.lr > 0, f"{section}.lr", "must be positive", self.lr)
        _require(0 <= self.momentum < 1, f"{section}.momentum", "must be in [0, 1)", self.momentum)
        _require(not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0), f"{section}.nesterov",
                 "needs optimizer sgd and a momentum above 0", self.nesterov)
        _require(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0", self.weight_decay)
        _require(self.epochs > 0, f"{section}.epochs", "must be positive", self.epochs)
        _require(self.min_steps >= 0, f"{section}.min_steps", "must be >= 0", self.min_steps)
        _require(self.batch_size > 0, f"{section}.batch_size", "must be positive", self.batch_size)
        _require(0 <= self.warmup_epochs < self.epochs, f"{section}.warmup_epochs",
                 f"must be in [0, {section}.epochs)", self.warmup_epochs)
        _require(self.patience is None or self.patience > 0, f"{section}.patience",
                 "must be a positive integer or null", self.patience)
        _require(0 <= self.label_smoothing < 1, f"{section}.label_smoothing", "must be in [0, 1)",
                 self.label_smoothing)


@dataclass(frozen=True)
class HeadParams(TrainParams):
    trainable: Literal["last", "classifier"]
    solver: Literal["minibatch", "lbfgs"]
    probe_layer: Literal["penultimate", "fc6", "body"]

    def __post_init__(self):
        super().__post_init__()
        _require(self.solver == "minibatch" or self.trainable == "last", "train_heads.solver",
                 "lbfgs fits the last Linear alone: set train_heads.trainable: last", self.solver)


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

    def __post_init__(self):
        super().__post_init__()
        _require(self.processes >= 1, "finetune.processes", "must be at least 1", self.processes)
        _require(self.batch_size >= self.processes, "finetune.batch_size",
                 "must be at least finetune.processes (the global batch is split across them)", self.batch_size)
        _require(self.unfreeze == "all" or self.unfreeze >= 0, "finetune.unfreeze",
                 "must be a number of blocks >= 0, or 'all'", self.unfreeze)
        _require(self.backbone_lr > 0, "finetune.backbone_lr", "must be positive", self.backbone_lr)
        _require(self.crop_padding >= 0, "finetune.crop_padding", "must be >= 0", self.crop_padding)
        _require(self.checkpoint_interval_s >= 0, "finetune.checkpoint_interval_s", "must be >= 0",
                 self.checkpoint_interval_s)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    flip: bool

    def __post_init__(self):
        _require(self.batch_size > 0, "evaluate.batch_size", "must be positive", self.batch_size)


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

    def __post_init__(self):
        _require(self.seed >= 0, "seed", "must be >= 0", self.seed)
        if self.weights not in ("imagenet", "none"):
            _require(Path(self.weights).exists(), "weights", "must be imagenet, none, the path of an existing "
                     "state_dict file, or a folder of them named after the models", self.weights)
            _require(self.model_weights.endswith(WEIGHTS_SUFFIXES), "weights",
                     "a state_dict file must end in .pth, .pt or .safetensors", self.weights)
        _require(self.strategy != "lp_ft" or self.weights != "none", "strategy",
                 "lp_ft fine-tunes from a probe of pretrained features, and weights is none: that is training from "
                 "scratch, strategy finetune", self.strategy)
        _require(self.strategy != "lp_ft" or self.train_heads.probe_layer == "penultimate", "train_heads.probe_layer",
                 "must be penultimate with strategy lp_ft: finetune starts from the probe as the model's own head",
                 self.train_heads.probe_layer)
        _require(self.model.strip() == self.model and self.model not in ("", "timm/"), "model",
                 "must name a torchvision model or timm/<name>", self.model)
        stored = self.data.stored_size or (None if self.data.source == "imagefolder" else 32)
        if stored:  # an image folder's own size is known once it is prepared: finetune checks it then
            check_crop_padding(self.finetune.crop_padding, stored)
        _require(self.train_heads.probe_layer == "penultimate" or self.model == "alexnet"
                 or self.model.startswith("vgg"), "train_heads.probe_layer",
                 "fc6 and body need AlexNet's or VGG's classifier: use penultimate", self.train_heads.probe_layer)
        if not self.data.has_validation:
            _require(self.train_heads.solver == "minibatch", "train_heads.solver",
                     "lbfgs chooses its L2 strength on a validation split: set data.val_fraction above 0",
                     self.train_heads.solver)
            for train in (self.train_heads, self.finetune):
                _require(train.patience is None, f"{train.section}.patience",
                         "needs a validation split: set data.val_fraction above 0, or patience: null", train.patience)


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
        _require(len(found) == 1, "weights", f"holds {len(found)} files for model {self.model} ({', '.join(found) or 'none'}): "
                 f"it needs one, named {name}.pth (or {name}.<tag>.pth)", self.weights)
        return found[0]

    @property
    def probes(self) -> bool:
        """The strategy trains a probe on cached features: feature extraction, and lp_ft before fine-tuning."""
        return self.strategy in ("feature_extraction", "lp_ft")

    @property
    def finetunes(self) -> bool:
        return self.strategy in ("finetune", "lp_ft")


def load(path=PARAMS_FILE) -> Params:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ParamError(f"{path} not found: run from the project's root") from None
    except yaml.YAMLError as error:
        raise ParamError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return validate(raw)


def validate(raw: dict) -> Params:
    """Params from params.yaml's content (nested), or the ParamError of its first mistake."""
    return _build(Params, raw, prefix="")


def resize_side(size: int, crop_pct: float) -> int:
    return math.floor(size / crop_pct)  # timm's rule; 224 / 0.875 = 256


def check_crop_padding(padding: int, stored: int) -> None:
    _require(padding < stored, "finetune.crop_padding", f"must be below the stored image size, {stored} px", padding)


def _require(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ParamError(f"params.yaml: {key} {rule}", value, restore_hint=True)


def _build(cls, raw, prefix: str):
    """Builds dataclass `cls` from a dict, rejecting unknown, missing and mistyped keys."""
    section = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamError(f"params.yaml: {section} must be a mapping (got {raw!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamError(f"params.yaml: unknown key {prefix}{unknown[0]} (known in {section}: {', '.join(names)})")
    values = {}
    for name in names:
        key = prefix + name
        if name not in raw:
            raise ParamError(f"params.yaml: missing key {key}")
        hint, value = hints[name], raw[name]
        if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            value = _parse_float(value)
        if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
            values[name] = _build(hint, value, prefix=key + ".")
        elif _fits(value, hint):
            values[name] = float(value) if hint is float else value
        else:
            _require(False, key, f"must be {_describe(hint)}", value)
    return cls(**values)


def _fits(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    return {type(None): "null", float: "a number", int: "an integer",
            bool: "true or false", str: "a string"}.get(hint, hint.__name__)


def _parse_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text
