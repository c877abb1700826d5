"""The device a stage runs on: choice, seeding, bf16 autocast, channels_last, torch.compile.
(Several processes under torchrun: stages/training/distributed.py; what inference records of the
machine: stages/model/hardware.py.)"""
import contextlib

import torch

from stages.pipeline.errors import UserError


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


def autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on the GPU, and on the CPU for inference with `cpu_bf16` (hardware.bf16_on_cpu); else
    float32. Training on the CPU stays float32."""
    if device.type == "cuda" or cpu_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Moves a model to the device, channels_last: convolutions run faster so, on the GPU and the CPU."""
    return model.to(device, memory_format=torch.channels_last)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile'd when `compile: true`; the parameters stay shared with `module`."""
    return torch.compile(module) if enabled else module
