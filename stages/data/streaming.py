"""A whole prepared split as model inputs, read from its memory-mapped file a batch at a time:
cache-features' and evaluate's way through the data, whose memory does not grow with the split."""
from typing import Iterator

import numpy as np
import torch

from stages.data import arrays, inputs


def split_inputs(images: np.ndarray, preprocess: inputs.Preprocess, batch_size: int, device: torch.device,
                 flip: bool = False) -> Iterator[tuple[torch.Tensor, int]]:
    """inputs.image_inputs for a split that arrays.open_split mapped: the same batches, in order."""
    for batch, count in device_batches(images, batch_size, device):
        yield inputs.model_input(inputs.flip_lr(batch) if flip else batch, preprocess), count


def device_batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, int]]:
    """uint8 batches of `batch_size` rows on the device, the last one padded with zeros, and the count
    of real rows in each, read into two host buffers in turn (pinned on the GPU, so that the copy
    overlaps the next read). A batch is valid until the next but one is drawn."""
    pinned = device.type == "cuda"
    buffers = [torch.zeros((batch_size, *images.shape[1:]), dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
    copies = [None, None]
    for turn, start in enumerate(range(0, len(images), batch_size)):
        host = buffers[turn % 2]
        if copies[turn % 2] is not None:
            copies[turn % 2].synchronize()  # its previous batch has reached the device
        count = len(arrays.read_rows(images, start, host.numpy()))
        host[count:] = 0
        yield host.to(device, non_blocking=pinned), count
        if pinned:
            copies[turn % 2] = torch.cuda.Event()
            copies[turn % 2].record()
