"""What a stage's outputs were made from, as DVC compares it before it reruns the stage: the content
of every dep that dvc.yaml lists for it (data, code) and of the weights file, and the values of its
params. A checkpoint is resumed, and a feature cache evaluated, only under the same identity."""
import hashlib
import json
from pathlib import Path

import yaml

from stages.pipeline.params import PARAMS_FILE

ROOT = Path(__file__).resolve().parents[2]  # the project whose code runs: its dvc.yaml and stages/


def stage_identity(stage: str, weights: str) -> str:
    """sha256 of stage_inputs."""
    return hashlib.sha256(json.dumps(stage_inputs(stage, weights), sort_keys=True).encode()).hexdigest()


def stage_inputs(stage: str, weights: str) -> dict:
    """{"deps": {path: sha256}, "params": {key: value}}: the content of the stage's deps and of the
    weights file (a dep that check-inputs stands in for), and its params' values, as dvc.yaml lists
    them. Code deps are read where the code is, the others in the working folder (the same one, but
    for a stage run by hand elsewhere)."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    values = yaml.safe_load(Path(PARAMS_FILE).read_text())
    files = [*declared.get("deps", []), *([weights] if Path(weights).is_file() else [])]
    located = {path: ROOT / path if path.startswith("stages/") else Path(path) for path in files}
    return {"deps": {path: content_sha256(where) for path, where in located.items()},
            "params": {key: dotted(values, key) for key in declared.get("params", [])}}


def content_sha256(path: Path) -> str | None:
    """A file's sha256, or a folder's over its files' relative paths and hashes; None if missing."""
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        listing = "".join(f"{f.relative_to(path)}\0{content_sha256(f)}\n" for f in files)
        return hashlib.sha256(listing.encode()).hexdigest()
    if not path.is_file():
        return None
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def dotted(values: dict, key: str):
    for part in key.split("."):
        values = values[part]
    return values
