"""On-device augmentation for fine-tuning: per-image flips and crops, in one batch.

Done at the stored size (32 px for CIFAR), on the uint8 images, before the resize, like
airbench's batch_flip_lr and batch_crop.
"""
import torch


def augment(images: torch.Tensor, flip: bool, crop_padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops after reflect padding, per image, as one gather.

    uint8 N×H×W×3 in and out.
    """
    if not flip and not crop_padding:
        return images
    n, h, w, _ = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if flip:
        flipped = torch.rand(n, generator=generator, device=device) < 0.5
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    if crop_padding:
        shifts = torch.randint(-crop_padding, crop_padding + 1, (2, n, 1), generator=generator, device=device)
        rows, cols = reflected(rows + shifts[0], h), reflected(cols + shifts[1], w)
    return images[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]


def reflected(index: torch.Tensor, length: int) -> torch.Tensor:
    """Indices past either edge mirrored back inside, as F.pad's reflect mode pads."""
    return (length - 1) - ((length - 1) - index.abs()).abs()
