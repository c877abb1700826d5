"""Checkpoints of a fit, so that an interrupted run resumes where it stopped. A checkpoint is
resumed only by a run of the same identity: the content of every dep that dvc.yaml lists for the
stage (data, code) and of the weights file, and the values of its params, which is what DVC itself
compares before it reruns a stage."""
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

import yaml

from stages.model.backbones import load_tensors
from stages.pipeline.errors import UserError
from stages.pipeline.outputs import replaced
from stages.pipeline.params import PARAMS_FILE

ROOT = Path(__file__).resolve().parents[2]  # the project whose code runs: its dvc.yaml and stages/


def stage_identity(stage: str, weights: str) -> str:
    """sha256 of the stage's deps' content, the weights file's (a dep that check-inputs stands in
    for) and its params' values, as dvc.yaml lists them. Code deps are read where the code is, the
    others in the working folder (the same one, but for a stage run by hand elsewhere)."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    values = yaml.safe_load(Path(PARAMS_FILE).read_text())
    files = [*declared.get("deps", []), *([weights] if Path(weights).is_file() else [])]
    located = {path: ROOT / path if path.startswith("stages/") else Path(path) for path in files}
    return hashlib.sha256(json.dumps({"deps": {path: content_sha256(where) for path, where in located.items()},
                                      "params": {key: dotted(values, key) for key in declared.get("params", [])}},
                                     sort_keys=True).encode()).hexdigest()


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


class Checkpoints:
    """Where an interrupted fit resumes from: one file, for one identity (stage_identity).

    Written at the end of an epoch once `interval_s` seconds of training have passed since the
    last one (0: every epoch), so that a fast GPU epoch does not pay for a 1.1 GB write each
    time (VGG16 with SGD; AlexNet's 0.46 GB took 0.4-0.9 s on the 2-core CPU). A kill -9 during
    a write leaves the previous file whole.
    """
    def __init__(self, folder: Path, identity: str, interval_s: float = 0.0):
        self.path, self.identity, self.interval_s = folder / identity[:16] / "last.pt", identity, interval_s
        self.unsaved_s = 0.0

    def load(self) -> dict | None:
        """The checkpoint if it was written for the same identity. One that can't be read
        safely is ignored with a warning, and training starts over."""
        if not self.path.exists():
            others = [p for p in self.path.parent.parent.glob("*/last.pt") if p != self.path]
            if others:
                print(f"no checkpoint for these inputs ({len(others)} in {self.path.parent.parent}/ for other "
                      "data, weights, code or params): training starts afresh")
            return None
        try:
            saved = load_tensors(self.path)
        except UserError as error:
            print(f"warning: {error}; training starts over", file=sys.stderr)
            return None
        if not isinstance(saved, dict) or saved.get("identity") != self.identity:
            print(f"ignoring {self.path}: it was written for other data, weights, code or params; training starts afresh")
            return None
        return saved

    def due(self, epoch_seconds: float) -> bool:
        self.unsaved_s += epoch_seconds
        return self.unsaved_s >= self.interval_s

    def save(self, changing: dict, settled: dict) -> None:
        """`changing`: tensors that training goes on updating in place, copied first; `settled`:
        values that no longer change (best_state is replaced, never updated), written as they are."""
        with replaced(self.path) as partial:  # a kill -9 leaves the previous epoch's checkpoint whole
            torch.save({**host_copy(changing), **settled, "identity": self.identity}, partial)
        self.unsaved_s = 0.0

    def remove(self) -> None:
        """The run completed: nothing to resume (none was written if it ran one epoch)."""
        shutil.rmtree(self.path.parent, ignore_errors=True)


def host_copy(value):
    """`value` with each tensor in its dicts and lists copied to host memory."""
    if isinstance(value, torch.Tensor):  # same strides: a fused optimizer resumed on channels_last needs them
        return torch.empty_like(value, device="cpu").copy_(value.detach())
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value
