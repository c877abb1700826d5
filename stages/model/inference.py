"""A trained model run forward without training: logits in order, and their loss and accuracy.
Evaluate's, and validation's in both training stages."""
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stages.model.devices import autocast

FEATURE_BATCH = 4096  # cached feature vectors per forward of a head: it sets memory, not results


def feature_inputs(features: torch.Tensor, device: torch.device) -> Iterator[tuple[torch.Tensor, int]]:
    """(float32 inputs on the device, count) for fp16 features, in order, as predict takes them."""
    return ((x.to(device).float(), len(x)) for x in features.split(FEATURE_BATCH))


@torch.no_grad()
def predict(model: nn.Module, inputs: Iterable[tuple[torch.Tensor, int]], device: torch.device,
            cpu_bf16: bool = False) -> torch.Tensor:
    """float32 logits on the CPU, in the order of the inputs; each batch keeps its first `count` rows.
    They stay on the device until the end: one copy to the host, no synchronisation per batch.
    `cpu_bf16`: under bf16 autocast on the CPU too (hardware.bf16_on_cpu)."""
    model.eval()
    outputs = []
    for x, count in inputs:
        with autocast(device, cpu_bf16):
            outputs.append(model(x)[:count].float())
    return torch.cat(outputs).cpu()


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    labels = labels.to(logits.device)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
