"""On-device augmentation for fine-tuning: per-image flips and crops, in one batch.

Done at the stored size (32 px for CIFAR), before the resize, like airbench's batch_flip_lr
and batch_crop.
"""
import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, flip: bool, crop_padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops after reflect padding, per image.

    uint8 N×H×W×3 in, float N×3×H×W in [0, 1] out, at the stored size.
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
