"""Checkpoints of a fit, so that an interrupted run resumes where it stopped: one file per
fingerprint (params and data), written from a host copy by a background thread."""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from stages.model.backbones import load_tensors
from stages.pipeline.errors import UserError
from stages.pipeline.outputs import replaced


class Checkpoints:
    """Where an interrupted fit resumes from: one file, for one fingerprint (params and data).

    Written at the end of an epoch once `interval_s` seconds of training have passed since the
    last one (0: every epoch), so that a fast GPU epoch does not pay for a 1.1 GB write each
    time (VGG16 with SGD; AlexNet's 0.46 GB took 0.4-0.9 s on the 2-core CPU). The write runs in
    a background thread from a host copy taken at once, while the next epoch trains; one at a
    time, and close() waits for the last. A kill -9 during a write leaves the previous file whole.
    """
    def __init__(self, path: Path, fingerprint: str, device: torch.device, interval_s: float = 0.0):
        self.path, self.fingerprint, self.interval_s = path, fingerprint, interval_s
        self.on_gpu = device.type == "cuda"
        self.unsaved_s, self.thread, self.writing = 0.0, ThreadPoolExecutor(1), None

    def load(self) -> dict | None:
        """The checkpoint if it was written for the same fingerprint. One that can't be read
        safely is ignored with a warning, and training starts over."""
        if not self.path.exists():
            return None
        try:
            saved = load_tensors(self.path)
        except UserError as error:
            print(f"warning: {error}; training starts over", file=sys.stderr)
            return None
        if not isinstance(saved, dict) or saved.get("fingerprint") != self.fingerprint:
            print(f"ignoring {self.path}: it was written for other params or data")
            return None
        return saved

    def due(self, epoch_seconds: float) -> bool:
        self.unsaved_s += epoch_seconds
        return self.unsaved_s >= self.interval_s

    def save(self, changing: dict, settled: dict) -> None:
        """`changing`: tensors that training goes on updating in place, copied now; `settled`:
        values that no longer change (best_state is replaced, never updated), written as they are."""
        copied = {**host_copy(changing, pinned=self.on_gpu), **settled, "fingerprint": self.fingerprint}
        ready = torch.cuda.Event() if self.on_gpu else None
        if ready:
            ready.record()
        self.wait()
        self.writing = self.thread.submit(self.write, copied, ready)
        self.unsaved_s = 0.0

    def write(self, state: dict, ready) -> None:
        if ready:
            ready.synchronize()  # the copies off the GPU are complete
        save_checkpoint(self.path, state)

    def wait(self) -> None:
        if self.writing:
            self.writing.result()  # raises what the write raised
            self.writing = None

    def close(self) -> None:
        self.wait()
        self.thread.shutdown()


def save_checkpoint(path: Path, state: dict) -> None:
    with replaced(path) as partial:  # a kill -9 leaves the previous epoch's checkpoint whole
        torch.save(state, partial)


def host_copy(value, pinned: bool = False):
    """`value` with each tensor in its dicts and lists copied to host memory. pinned: into
    page-locked memory, asynchronously from a GPU; synchronise before reading the copies."""
    if isinstance(value, torch.Tensor):  # same strides: a fused optimizer resumed on channels_last needs them
        copy = torch.empty_like(value, device="cpu", pin_memory=pinned)
        return copy.copy_(value.detach(), non_blocking=pinned)
    if isinstance(value, dict):
        return {k: host_copy(v, pinned) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v, pinned) for v in value)
    return value
