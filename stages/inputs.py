"""Model inputs made on the device: uint8 images in, resized, center-cropped, normalised batches out.

The prepared images stay uint8 at their stored size (32 px for CIFAR), the way airbench keeps
CIFAR-10 on the GPU; each batch is resized to data.image_size / data.crop_pct, center-cropped
to data.image_size and normalised there, with the interpolation, mean and std of the weights:
torchvision's Resize(256) + CenterCrop(224) is crop_pct 0.875 at 224 px. No per-image PIL
transforms, no DataLoader workers. Every batch has the same shape (the last one is padded),
so cuDNN tunes once per stage.
"""
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # a mode of torch.nn.functional.interpolate: bilinear, bicubic or nearest


def resize_size(size: int, crop_pct: float) -> int:
    return math.floor(size / crop_pct)  # timm's rule; 224 / 0.875 = 256


def model_input(images: torch.Tensor, preprocess: Preprocess, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """uint8 N×H×W×3 (or float N×3×H×W in [0, 1]) -> normalised float N×3×size×size, channels_last."""
    if images.dtype == torch.uint8:  # contiguous NCHW: interpolate is 3x slower on the CPU otherwise
        images = images.permute(0, 3, 1, 2).contiguous().float().div_(255)
    x = images
    side = resize_size(size, crop_pct)
    if x.shape[-2:] != (side, side):
        downsampling = x.shape[-1] > side
        x = F.interpolate(x, size=(side, side), mode=preprocess.interpolation, antialias=downsampling,
                          **({} if preprocess.interpolation == "nearest" else {"align_corners": False}))
        if preprocess.interpolation == "bicubic":
            x = x.clamp_(0, 1)  # bicubic overshoots; PIL clamps too
    top = int(round((side - size) / 2.0))  # torchvision's CenterCrop
    x = x[:, :, top:top + size, top:top + size]
    std = torch.tensor(preprocess.std, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, 3, 1, 1)
    normalised = torch.empty(x.shape, device=x.device, memory_format=torch.channels_last)
    return torch.addcmul(-mean / std, x, 1 / std, out=normalised)  # one pass: (x - mean) / std


def flip_lr(images: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of uint8 N×H×W×3 images."""
    return images.flip(2)


def padded(batch: torch.Tensor, rows: int) -> torch.Tensor:
    """`batch` with zero rows appended up to `rows`."""
    if len(batch) == rows:
        return batch
    return torch.cat([batch, batch.new_zeros((rows - len(batch), *batch.shape[1:]))])


def image_inputs(images: torch.Tensor, preprocess: Preprocess, size: int, crop_pct: float, batch_size: int,
                 device: torch.device, flip: bool = False) -> Iterator[tuple[torch.Tensor, int]]:
    """(inputs, count) for uint8 N×H×W×3 images, in order. Every batch has `batch_size` rows
    (the last one padded with zeros); its first `count` rows are real."""
    if images.device != device and device.type == "cuda":
        images = images.pin_memory()  # for non_blocking copies
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        count = len(batch)
        batch = padded(batch, batch_size).to(device, non_blocking=True)
        yield model_input(flip_lr(batch) if flip else batch, preprocess, size, crop_pct), count


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether `nbytes` more fit in the device's free memory with room to spare (always on the CPU)."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes < 0.5 * free


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)
