"""Model inputs made on the device: uint8 images in, resized, center-cropped, normalised batches out.

The prepared images stay uint8 at their stored size (32 px for CIFAR), the way airbench keeps
CIFAR-10 on the GPU; each batch is resized to data.image_size / data.crop_pct, center-cropped
to data.image_size and normalised there, with the interpolation, mean and std of the weights:
torchvision's Resize(256) + CenterCrop(224) is crop_pct 0.875 at 224 px. No per-image PIL
transforms, no DataLoader workers. Every batch of image_inputs (validation; cache-features' and
evaluate's through stages/data/streaming.py) has the same shape, the last one padded, so cuDNN
tunes once for them; training's batches share one shape only with drop_last.
"""
import dataclasses
import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from stages.data import arrays
from stages.pipeline import params


@dataclass(frozen=True)
class Preprocess:
    """How images become the model's input: the weights' interpolation, mean and std, and the size
    and crop of data.image_size and data.crop_pct (network.preprocess.at(...) sets them)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # a mode of torch.nn.functional.interpolate: bilinear, bicubic or nearest
    size: int = 224  # side of the model's input
    crop_pct: float = 1.0  # resized to size / crop_pct, then center-cropped to size

    def at(self, size: int, crop_pct: float = 1.0) -> "Preprocess":
        return dataclasses.replace(self, size=size, crop_pct=crop_pct)


def model_input(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 N×H×W×3 -> normalised float N×3×size×size, channels_last.

    Resizing is linear and separable, and so are the center crop and the per-channel normalisation:
    together they are one matrix per axis, applied as two matrix products straight from the uint8
    layout into channels_last. That is 4x faster than interpolate-crop-normalise on the CPU, and on
    the GPU it is two small GEMMs, with the same values up to float rounding (tests/test_inputs.py).
    """
    n, h, w, channels = images.shape
    size = preprocess.size
    rows, columns, shift, low, high = resize_maps(preprocess, h, w, images.device)
    x = torch.addmm(shift, images.reshape(n * h, w * channels).float(), columns)  # (N·H) × (size·3)
    x = torch.matmul(rows, x.view(n, h, size * channels)).view(n, size, size, channels)
    if preprocess.interpolation == "bicubic":
        x = x.clamp_(low, high)  # bicubic overshoots; PIL clamps too (at 0 and 255, here normalised)
    return x.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def resize_maps(preprocess: Preprocess, height: int, width: int, device: torch.device):
    """The matrices and vectors of model_input for one input shape: the rows' resize-and-crop
    (size × H), the columns' with the normalisation's scale folded in ((W·3) × (size·3)), the
    normalisation's shift per output column, and the normalised values of 0 and 255 per channel."""
    size, side = preprocess.size, params.resize_side(preprocess.size, preprocess.crop_pct)
    mean = torch.tensor(preprocess.mean, dtype=torch.float64)
    std = torch.tensor(preprocess.std, dtype=torch.float64)
    rows = axis_map(height, side, size, preprocess.interpolation)
    columns = torch.kron(axis_map(width, side, size, preprocess.interpolation), torch.diag(1 / (255 * std))).T
    shift = (-mean / std).repeat(size)  # each row of an axis map sums to 1, so the shift passes through both
    maps = rows, columns, shift, -mean / std, (1 - mean) / std
    return tuple(m.to(device, torch.float32) for m in maps)


def axis_map(stored: int, side: int, size: int, interpolation: str) -> torch.Tensor:
    """size × stored: row i holds the weights of the stored pixels in output pixel i of torch's
    resize from `stored` to `side` pixels (antialiased when shrinking), center-cropped to `size`.
    Made by resizing the identity image's height, so it is exactly F.interpolate's filter (not
    a stored × 1 image: antialiasing treats a side of 1 differently)."""
    identity = torch.eye(stored, dtype=torch.float64).view(1, 1, stored, stored)
    exact = {} if interpolation == "nearest" else {"align_corners": False, "antialias": side < stored}
    resized = F.interpolate(identity, size=(side, stored), mode=interpolation, **exact)[0, 0]
    top = int(round((side - size) / 2.0))  # torchvision's CenterCrop
    return resized[top:top + size]


def flip_lr(images: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of uint8 N×H×W×3 images."""
    return images.flip(2)


def padded(batch: torch.Tensor, rows: int) -> torch.Tensor:
    """`batch` with zero rows appended up to `rows`."""
    if len(batch) == rows:
        return batch
    return torch.cat([batch, batch.new_zeros((rows - len(batch), *batch.shape[1:]))])


def image_inputs(images: torch.Tensor, preprocess: Preprocess, batch_size: int, device: torch.device,
                 flip: bool = False) -> Iterator[tuple[torch.Tensor, int]]:
    """(inputs, count) for uint8 N×H×W×3 images, in order. Every batch has `batch_size` rows
    (the last one padded with zeros); its first `count` rows are real. (A whole split as numpy,
    read from its file a batch at a time: streaming.split_inputs.)"""
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        x = padded(batch, batch_size).to(device, non_blocking=True)
        yield model_input(flip_lr(x) if flip else x, preprocess), len(batch)


TO_DEVICE_ROWS = 4096  # images per copy of a memory-mapped split to the GPU


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """The array as a tensor on the device. On the CPU a memory-mapped split stays mapped (its pages
    are read as they are used, and the kernel may drop them); on the GPU it is read from its file
    TO_DEVICE_ROWS rows at a time into one pinned buffer (arrays.read_rows), so that this process
    never holds the whole of it."""
    if device.type == "cpu" or not isinstance(array, np.memmap):
        return torch.from_numpy(np.asarray(array)).to(device)
    copy = torch.empty(array.shape, dtype=torch.uint8, device=device)
    buffer = torch.empty((TO_DEVICE_ROWS, *array.shape[1:]), dtype=torch.uint8, pin_memory=True)
    for start in range(0, len(array), TO_DEVICE_ROWS):
        rows = len(arrays.read_rows(array, start, buffer.numpy()))
        copy[start:start + rows] = buffer[:rows]  # synchronous: the buffer is read into again next
    return copy
