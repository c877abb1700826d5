"""Named training protocols (stages/study/protocols.yaml): sets of `-S key=value` overrides.

    python -m stages.study.protocols readme        # prints: -S data.crop_pct=1.0 -S ...
    dvc exp run $(python -m stages.study.protocols readme)
    dvc exp run $(python -m stages.study.protocols best --scratch) -S strategy=finetune   # from random weights
"""
import re
import sys
from pathlib import Path

import yaml

from stages.study.experiments import flat

_FILE = yaml.safe_load((Path(__file__).parent / "protocols.yaml").read_text())
PROTOCOLS = {name: {k: v for k, v in keys.items() if k != "scratch"} for name, keys in _FILE.items()}
SCRATCH = {name: keys.get("scratch") or {} for name, keys in _FILE.items()}  # on top, for training from scratch
PUBLISHED_PROTOCOL = "notebook"  # the protocol that produced the study's published numbers


def overrides(name: str, scratch: bool = False) -> dict:
    """The protocol's settings; with `scratch`, its recipe for training from random weights."""
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})")
    return {**PROTOCOLS[name], **(SCRATCH[name] if scratch else {})}


def is_scratch(params: dict) -> bool:
    """Fine-tuning from random weights: the study's scratch strategy (params nested or flat)."""
    return params.get("strategy") == "finetune" and params.get("weights") == "none"


def strategy_of(params: dict) -> str:
    """feature_extraction, finetune, lp_ft or scratch."""
    return "scratch" if is_scratch(params) else params.get("strategy")


def protocol_of(params: dict) -> str | None:
    """The protocol whose every key has its value in `params` (nested, as in params.yaml), if any;
    a run from scratch is held against the protocol's scratch recipe."""
    for name in PROTOCOLS:
        if not differences(params, name):
            return name
    return None


def nearest(params: dict) -> str:
    """The protocol that the fewest of `params` (nested) differ from."""
    return min(PROTOCOLS, key=lambda name: len(differences(params, name)))


def differences(params: dict, name: str) -> list[str]:
    """The keys of protocol `name` (its scratch recipe for a run from scratch) whose value in `params` differs."""
    present = flat(params)
    return [key for key, value in overrides(name, is_scratch(params)).items() if not _same(present.get(key), value)]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def flags(name: str, scratch: bool = False) -> list[str]:
    return set_flags({**overrides(name, scratch), **({"weights": "none"} if scratch else {})})


def set_flags(settings: dict) -> list[str]:
    """{dotted key: value} as `dvc exp run`'s -S flags."""
    return [arg for key, value in settings.items() for arg in ("-S", f"{key}={value_text(value)}")]


def value_text(value) -> str:
    """A value as DVC's -S reads it back (Hydra's override grammar, then params.yaml).

    Strings are quoted, so that `a,b` stays one value and not a sweep, and `1e-3` or `null` stay
    strings; inside quotes a backslash is literal unless a quote or the end follows it."""
    if isinstance(value, str):
        return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    raise TypeError(f"only a string, number, boolean or null can be set, not {value!r}")


def main():
    args = sys.argv[1:]
    if len(args) not in (1, 2) or args[0] not in PROTOCOLS or args[1:] not in ([], ["--scratch"]):
        print(f"usage: python -m stages.study.protocols {{{'|'.join(PROTOCOLS)}}} [--scratch]", file=sys.stderr)
        sys.exit(2)
    print(" ".join(flags(args[0], scratch=args[1:] == ["--scratch"])))


if __name__ == "__main__":
    main()
