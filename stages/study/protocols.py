"""Named training protocols (stages/study/protocols.yaml): sets of `-S key=value` overrides.

    python -m stages.study.protocols readme        # prints: -S data.crop_pct=1.0 -S ...
    dvc exp run $(python -m stages.study.protocols readme)
"""
import re
import sys
from pathlib import Path

import yaml

PROTOCOLS = yaml.safe_load((Path(__file__).parent / "protocols.yaml").read_text())
PUBLISHED_PROTOCOL = "notebook"  # the protocol that produced the study's published numbers


def overrides(name: str) -> dict:
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})")
    return dict(PROTOCOLS[name])


def lookup(nested: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(nested, dict) or key not in nested:
            return None
        nested = nested[key]
    return nested


def protocol_of(params: dict) -> str | None:
    """The protocol whose every key has its value in `params` (nested, as in params.yaml), if any."""
    for name, settings in PROTOCOLS.items():
        if all(_same(lookup(params, key), value) for key, value in settings.items()):
            return name
    return None


def nearest(params: dict) -> str:
    """The protocol that the fewest of `params` (nested) differ from."""
    return min(PROTOCOLS, key=lambda name: len(differences(params, name)))


def differences(params: dict, name: str) -> list[str]:
    """The keys of protocol `name` whose value in `params` differs."""
    return [key for key, value in PROTOCOLS[name].items() if not _same(lookup(params, key), value)]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def flags(name: str) -> list[str]:
    return [arg for key, value in overrides(name).items() for arg in ("-S", f"{key}={value_text(value)}")]


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
    if len(sys.argv) != 2 or sys.argv[1] not in PROTOCOLS:
        print(f"usage: python -m stages.study.protocols {{{'|'.join(PROTOCOLS)}}}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(flags(sys.argv[1])))


if __name__ == "__main__":
    main()
