"""The device a stage runs on: choice, seeding, bf16 autocast, channels_last, torch.compile, and
the process group when torchrun started the stage (one GPU per process; gloo on the CPU)."""
import contextlib
import ctypes
import datetime
import os
import signal
import sys

import torch
import torch.distributed as dist

from stages.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device is cuda, but no CUDA GPU is visible: use device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def setup(device_param: str, seed: int = 0) -> torch.device:
    """The device to use, seeded, with the GPU's fast paths on."""
    device = pick_device(device_param)
    torch.manual_seed(seed)
    if device.type == "cuda":
        # Inference batches share one shape (inputs.py pads them), training's too with drop_last: cuDNN tunes once
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device):
    """bf16 autocast on the GPU; float32 on the CPU, where results are also deterministic."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Moves a model to the device, channels_last: convolutions run faster so, on the GPU and the CPU."""
    return model.to(device, memory_format=torch.channels_last)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile'd when `compile: true`; the parameters stay shared with `module`."""
    return torch.compile(module) if enabled else module


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def visible_gpus() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


WRITER_NODE = "STAGES_WRITER_NODE"  # set on the node that DVC started: its local rank 0 alone writes


def setup_processes(device_param: str, seed: int, timeout_s: float = 600) -> torch.device:
    """setup(), and under torchrun the process group: NCCL with one GPU per process, or gloo on the
    CPU; a collective that waits longer than timeout_s (a node died) fails instead of hanging."""
    device = setup(device_param, seed)
    if not under_torchrun():
        return device
    die_with_torchrun()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return device


def die_with_torchrun() -> None:
    """torchrun starts each process in a session of its own, so a kill -9 of the stage (or of the
    dvc above it) would leave them training, and writing checkpoints, beside the rerun."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def is_main_process() -> bool:
    """The one process that writes: alone, or local rank 0 on the first node (torchrun's c10d
    rendezvous numbers the nodes in no set order, so global rank 0 may be on a joining node)."""
    return not dist.is_initialized() or (os.environ.get(WRITER_NODE) == "1" and os.environ.get("LOCAL_RANK") == "0")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
