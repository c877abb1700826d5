"""On-device batches: uint8 images in, normalised float batches out, augmented there.

The prepared images stay uint8 at their stored size (32 px for CIFAR) on the device, the way
airbench keeps CIFAR-10 on the GPU; each batch is flipped, cropped, upsampled to
data.image_size and normalised there. No per-image PIL transforms, no DataLoader workers.
"""
import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from stages.backbones import Preprocess
from stages.params import UserError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device is cuda, but no CUDA GPU is visible: use device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on the GPU; float32 on the CPU, where it is also deterministic."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup(device_param: str, seed: int) -> torch.device:
    """The device to use, seeded, with the GPU's fast paths on."""
    device = pick_device(device_param)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Moves a model to the device, channels_last: convolutions run faster so, on the GPU and the CPU."""
    return model.to(device, memory_format=torch.channels_last)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def model_input(images: torch.Tensor, preprocess: Preprocess, size: int) -> torch.Tensor:
    """uint8 N×H×W×3 (or float N×3×H×W in [0, 1]) -> normalised float N×3×size×size, channels_last
    (convolutions run faster so, on the GPU and on the CPU)."""
    if images.dtype == torch.uint8:  # contiguous NCHW: interpolate is 3x slower on the CPU otherwise
        images = images.permute(0, 3, 1, 2).contiguous().float().div_(255)
    x = images
    if x.shape[-1] != size:
        downsampling = x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode=preprocess.interpolation, antialias=downsampling,
                          **({} if preprocess.interpolation == "nearest" else {"align_corners": False}))
        if preprocess.interpolation == "bicubic":
            x = x.clamp_(0, 1)  # bicubic overshoots; PIL clamps too
    std = torch.tensor(preprocess.std, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, 3, 1, 1)
    normalised = torch.empty_like(x, memory_format=torch.channels_last)
    return torch.addcmul(-mean / std, x, 1 / std, out=normalised)  # one pass: (x - mean) / std


def flip_lr(images: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of uint8 N×H×W×3 images."""
    return images.flip(2)


def augment(images: torch.Tensor, flip: bool, crop_padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops after reflect padding, per image, in one batch.

    uint8 N×H×W×3 in, float N×3×H×W in [0, 1] out, at the stored size (before the upsample).
    """
    x = images.permute(0, 3, 1, 2).contiguous().float().div_(255)
    n, _, h, w = x.shape
    if flip:
        flipped = torch.rand(n, generator=generator, device=x.device) < 0.5
        x = torch.where(flipped.view(n, 1, 1, 1), x.flip(3), x)
    if crop_padding:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p), mode="reflect")
        dy, dx = (torch.randint(0, 2 * p + 1, (2, n), generator=generator, device=x.device))
        rows = (torch.arange(h, device=x.device) + dy[:, None])[:, None, :, None]  # n×1×h×1
        cols = (torch.arange(w, device=x.device) + dx[:, None])[:, None, None, :]  # n×1×1×w
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(3, device=x.device).view(1, 3, 1, 1)
        x = padded[batch, channel, rows, cols]
    return x


def image_inputs(images: torch.Tensor, preprocess: Preprocess, size: int, batch_size: int,
                 device: torch.device, flip: bool = False) -> Iterator[torch.Tensor]:
    """Model inputs for uint8 N×H×W×3 images, batch by batch, in order."""
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        yield model_input(flip_lr(batch) if flip else batch, preprocess, size)
