"""params.yaml, loaded once and validated into frozen dataclasses.

    python -m stages.params          # the check-params stage: validate, then write data/params.ok

Every stage calls `load()` first, so a wrong key, type or value stops it with a one-line
error before it touches an output. The check-params stage runs the same validation ahead
of every other stage, so that `dvc repro` stops before DVC deletes any stage's outputs.
"""
import json
import shutil
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Union

import yaml

PARAMS_FILE = "params.yaml"
CHECKED_MARKER = Path("data/params.ok")


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


class ParamError(UserError):
    pass


def run_stage(main) -> None:
    """Runs a stage's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@dataclass(frozen=True)
class SyntheticParams:
    classes: int  # number of classes
    train_per_class: int  # images per class in the source's train split
    test_per_class: int  # images per class in the source's test split


@dataclass(frozen=True)
class DataParams:
    source: Literal["cifar10", "cifar100", "imagefolder", "synthetic"]
    root: str  # download folder, or the image folder's root
    image_size: int  # side of the images the backbone sees; upsampled on the device
    val_fraction: float  # share of each train class carved out for validation
    limit_per_class: Union[int, None]  # cap per class and split, applied before the val carve
    stored_size: int  # side of the stored uint8 images; an image folder is resized to it
    skip_unreadable: bool  # image folder: skip files PIL cannot read instead of failing
    synthetic: SyntheticParams

    def __post_init__(self):
        _require(self.image_size >= 16, "data.image_size", "must be at least 16", self.image_size)
        _require(0 < self.val_fraction < 1, "data.val_fraction", "must be in (0, 1)", self.val_fraction)
        _require(self.limit_per_class is None or self.limit_per_class > 0,
                 "data.limit_per_class", "must be a positive integer or null", self.limit_per_class)
        _require(self.stored_size >= 8, "data.stored_size", "must be at least 8", self.stored_size)
        _require(self.synthetic.classes >= 2, "data.synthetic.classes", "must be at least 2", self.synthetic.classes)
        for key in ("train_per_class", "test_per_class"):
            value = getattr(self.synthetic, key)
            _require(value > 0, f"data.synthetic.{key}", "must be positive", value)
        if self.source == "imagefolder":
            for split in ("train", "test"):
                _require(Path(self.root, split).is_dir(), "data.root",
                         f"must hold {split}/<class>/ image folders; set it to your image folder's root",
                         self.root)


@dataclass(frozen=True)
class FeatureParams:
    batch_size: int  # images per forward pass of the frozen body
    flip: bool  # also cache the features of horizontally flipped train images

    def __post_init__(self):
        _require(self.batch_size > 0, "features.batch_size", "must be positive", self.batch_size)


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int
    lr: float  # Adam's learning rate (for finetune: the head's)
    weight_decay: float
    schedule: Literal["constant", "cosine"]  # per step, after the warm-up
    warmup_epochs: int  # linear warm-up from 0
    patience: Union[int, None]  # early stopping: epochs without a better val accuracy; null: never

    def __post_init__(self):
        section = "finetune" if isinstance(self, FinetuneParams) else "train_heads"
        _require(self.epochs > 0, f"{section}.epochs", "must be positive", self.epochs)
        _require(self.batch_size > 0, f"{section}.batch_size", "must be positive", self.batch_size)
        _require(self.lr > 0, f"{section}.lr", "must be positive", self.lr)
        _require(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0", self.weight_decay)
        _require(0 <= self.warmup_epochs < self.epochs, f"{section}.warmup_epochs",
                 f"must be in [0, {section}.epochs)", self.warmup_epochs)
        _require(self.patience is None or self.patience > 0, f"{section}.patience",
                 "must be a positive integer or null", self.patience)


@dataclass(frozen=True)
class FinetuneParams(TrainParams):
    unfreeze: Union[int, Literal["all"]]  # the last N blocks of the backbone are trained
    backbone_lr: float  # Adam's learning rate for the unfrozen blocks
    flip: bool  # random horizontal flips, on the device
    crop_padding: int  # random crops after padding by this many pixels; 0 turns them off

    def __post_init__(self):
        super().__post_init__()
        _require(self.unfreeze == "all" or self.unfreeze >= 0, "finetune.unfreeze",
                 "must be a number of blocks >= 0, or 'all'", self.unfreeze)
        _require(self.backbone_lr > 0, "finetune.backbone_lr", "must be positive", self.backbone_lr)
        _require(self.crop_padding >= 0, "finetune.crop_padding", "must be >= 0", self.crop_padding)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int

    def __post_init__(self):
        _require(self.batch_size > 0, "evaluate.batch_size", "must be positive", self.batch_size)


@dataclass(frozen=True)
class Params:
    seed: int
    model: str  # alexnet | vgg16 | any torchvision classification model | timm/<name>
    weights: str  # imagenet | none | path to a state_dict file
    strategy: Literal["feature_extraction", "finetune"]
    device: Literal["auto", "cpu", "cuda"]
    data: DataParams
    features: FeatureParams
    train_heads: TrainParams
    finetune: FinetuneParams
    evaluate: EvaluateParams

    def __post_init__(self):
        _require(self.seed >= 0, "seed", "must be >= 0", self.seed)
        if self.weights not in ("imagenet", "none"):
            _require(Path(self.weights).is_file(), "weights",
                     "must be imagenet, none, or the path of an existing state_dict file", self.weights)
            _require(self.weights.endswith((".pth", ".pt", ".safetensors")), "weights",
                     "a state_dict file must end in .pth, .pt or .safetensors", self.weights)
        _require(_is_known_model(self.model), "model",
                 "is not a torchvision classification model nor timm/<a timm model name>", self.model)


def load(path=PARAMS_FILE) -> Params:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ParamError(f"{path} not found: run from the project's root") from None
    except yaml.YAMLError as error:
        raise ParamError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return _build(Params, raw, prefix="")


def _require(ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        raise ParamError(f"params.yaml: {key} {rule} (got {value!r})")


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
            raise ParamError(f"params.yaml: {key} must be {_describe(hint)} (got {value!r})")
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
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    return {type(None): "null", float: "a number", int: "an integer",
            bool: "true or false", str: "a string"}.get(hint, hint.__name__)


def _parse_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _is_known_model(name: str) -> bool:
    if name.startswith("timm/"):
        import timm
        return bool(timm.list_models(name.removeprefix("timm/")))
    import torchvision
    return name in torchvision.models.list_models(module=torchvision.models)


def start_strategy_stage(folder: Path, p: Params, strategy: str) -> bool:
    """Empties a strategy's output folder. When `strategy` is not the chosen one, leaves only a
    small note there and returns False: DVC's run-cache keeps the real outputs of that variant."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if p.strategy == strategy:
        return True
    (folder / "skipped.json").write_text(json.dumps({"skipped": f"strategy is {p.strategy}"}) + "\n")
    return False


def main():
    load()
    CHECKED_MARKER.parent.mkdir(parents=True, exist_ok=True)
    CHECKED_MARKER.write_text("params.yaml is valid\n")  # constant, so later stages don't rerun for it


if __name__ == "__main__":
    run_stage(main)
