"""Checkpoints of a fit, so that an interrupted run resumes where it stopped, and only a run of the
same identity (stages/pipeline/identity.py): the data, code, weights and params that DVC compares."""
import shutil
import sys
from pathlib import Path

import torch

from stages.model.backbones import load_tensors
from stages.pipeline.errors import UserError
from stages.pipeline.outputs import replaced


class Checkpoints:
    """Where an interrupted fit resumes from: one file, for one identity (identity.stage_identity).

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
