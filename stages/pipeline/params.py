"""params.yaml, loaded once and validated into frozen dataclasses.

Every stage calls `load()` first, so a wrong key, type or value stops it with a one-line
error before it touches an output; the check-inputs stage runs the same validation ahead of
every other stage, so that `dvc repro` stops before DVC deletes any stage's outputs.
`load()` is quick: it imports no model registry (check_inputs checks the model's name).
What each setting means is said once, in params.yaml's comments; here are their types and limits.
"""
import math
import operator
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


# The limits of the values, per section: (setting, rule, ok(value, section)), checked in this order
# once the section is built (data.synthetic before data, the sections before the whole). Those of
# "train" hold in train_heads and finetune alike.
LIMITS = {
    "data.synthetic": [("classes", "must be at least 2", lambda v, s: v >= 2),
                       ("train_per_class", "must be positive", lambda v, s: v > 0),
                       ("test_per_class", "must be positive", lambda v, s: v > 0)],
    "data": [
        ("split_seed", "must be >= 0", lambda v, d: v >= 0),
        ("image_size", "must be at least 16", lambda v, d: v >= 16),
        ("crop_pct", "must be in (0, 1]", lambda v, d: 0 < v <= 1),
        ("val_fraction", "must be in [0, 1)", lambda v, d: 0 <= v < 1),
        ("limit_per_class", "must be a positive integer or null", lambda v, d: v is None or v > 0),
        ("train_per_class", "must be a positive integer or null (every training image)", lambda v, d: v is None or v > 0),
        ("stored_size", "must be at least 8, or null", lambda v, d: v is None or v >= 8),
        ("stored_size", "must be null or 32 for CIFAR, whose images are 32 px",
         lambda v, d: v in (None, 32) or not d.source.startswith("cifar")),
        ("max_image_pixels", "must be positive", lambda v, d: v > 0),
        *[("root", f"must hold {split}/<class>/ image folders; set it to your image folder's root",
           lambda v, d, split=split: d.source != "imagefolder" or Path(v, split).is_dir()) for split in ("train", "test")]],
    "features": [("batch_size", "must be positive", lambda v, f: v > 0)],
    "train": [
        ("lr", "must be positive", lambda v, t: v > 0),
        ("momentum", "must be in [0, 1)", lambda v, t: 0 <= v < 1),
        ("nesterov", "needs optimizer sgd and a momentum above 0", lambda v, t: not v or (t.optimizer == "sgd" and t.momentum > 0)),
        ("weight_decay", "must be >= 0", lambda v, t: v >= 0),
        ("epochs", "must be positive", lambda v, t: v > 0),
        ("min_steps", "must be >= 0", lambda v, t: v >= 0),
        ("batch_size", "must be positive", lambda v, t: v > 0),
        ("warmup_epochs", "must be in [0, {section}.epochs)", lambda v, t: 0 <= v < t.epochs),
        ("patience", "must be a positive integer or null", lambda v, t: v is None or v > 0),
        ("label_smoothing", "must be in [0, 1)", lambda v, t: 0 <= v < 1)],
    "train_heads": [("solver", "lbfgs fits the last Linear alone: set train_heads.trainable: last",
                     lambda v, h: v == "minibatch" or h.trainable == "last")],
    "finetune": [
        ("processes", "must be at least 1", lambda v, f: v >= 1),
        ("batch_size", "must be at least finetune.processes (the global batch is split across them)",
         lambda v, f: v >= f.processes),
        ("unfreeze", "must be a number of blocks >= 0, or 'all'", lambda v, f: v == "all" or v >= 0),
        ("backbone_lr", "must be positive", lambda v, f: v > 0),
        ("crop_padding", "must be >= 0", lambda v, f: v >= 0),
        ("checkpoint_interval_s", "must be >= 0", lambda v, f: v >= 0)],
    "evaluate": [("batch_size", "must be positive", lambda v, e: v > 0)],
    "": [
        ("seed", "must be >= 0", lambda v, p: v >= 0),
        ("weights", "must be imagenet, none, the path of an existing state_dict file, or a folder of them named after "
         "the models", lambda v, p: v in ("imagenet", "none") or Path(v).exists()),
        ("weights", "a state_dict file must end in .pth, .pt or .safetensors",
         lambda v, p: v in ("imagenet", "none") or p.model_weights.endswith(WEIGHTS_SUFFIXES)),
        ("strategy", "lp_ft fine-tunes from a probe of pretrained features, and weights is none: that is training "
         "from scratch, strategy finetune", lambda v, p: v != "lp_ft" or p.weights != "none"),
        ("train_heads.probe_layer", "must be penultimate with strategy lp_ft: finetune starts from the probe as the "
         "model's own head", lambda v, p: p.strategy != "lp_ft" or v == "penultimate"),
        ("model", "must name a torchvision model or timm/<name>", lambda v, p: v.strip() == v and v not in ("", "timm/")),
        ("train_heads.probe_layer", "fc6 and body need AlexNet's or VGG's classifier: use penultimate",
         lambda v, p: v == "penultimate" or p.model == "alexnet" or p.model.startswith("vgg")),
        ("train_heads.solver", "lbfgs chooses its L2 strength on a validation split: set data.val_fraction above 0",
         lambda v, p: p.data.has_validation or v == "minibatch"),
        *[(f"{section}.patience", "needs a validation split: set data.val_fraction above 0, or patience: null",
           lambda v, p: p.data.has_validation or v is None) for section in ("train_heads", "finetune")]],
}


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
    p = _build(Params, raw, prefix="")
    stored = p.data.stored_size or (None if p.data.source == "imagefolder" else 32)
    if stored:  # an image folder's own size is known once it is prepared: finetune checks it then
        check_crop_padding(p.finetune.crop_padding, stored)
    return p


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
    built = cls(**values)
    for group in (["train"] if issubclass(cls, TrainParams) else []) + [prefix.rstrip(".")]:
        for name, rule, ok in LIMITS.get(group, []):
            value = operator.attrgetter(name)(built)
            _require(ok(value, built), prefix + name, rule.format(section=prefix.rstrip(".")), value)
    return built


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
