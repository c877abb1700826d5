"""params.yaml's types and limits, checked by check-inputs before any other stage runs, and by the
study cell by cell: a wrong key, type or value stops `dvc repro` in one line before DVC deletes any
stage's outputs. Only check-inputs and the study import this module, so that editing a rule reruns
no other stage; the stages read the content it validated (params.load).
"""
import operator
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Literal, Union

from stages.pipeline.params import (PARAMS_FILE, WEIGHTS_SUFFIXES, ParamError, Params, TrainParams,
                                    check_crop_padding, read, require)

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
    return validate(read(path))


def validate(raw: dict) -> Params:
    """Params from params.yaml's content (nested), or the ParamError of its first mistake."""
    p = _build(Params, raw, prefix="")
    stored = p.data.stored_size or (None if p.data.source == "imagefolder" else 32)
    if stored:  # an image folder's own size is known once it is prepared: finetune checks it then
        check_crop_padding(p.finetune.crop_padding, stored)
    return p


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
            require(False, key, f"must be {_describe(hint)}", value)
    built = cls(**values)
    for group in (["train"] if issubclass(cls, TrainParams) else []) + [prefix.rstrip(".")]:
        for name, rule, ok in LIMITS.get(group, []):
            value = operator.attrgetter(name)(built)
            require(ok(value, built), prefix + name, rule.format(section=prefix.rstrip(".")), value)
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
