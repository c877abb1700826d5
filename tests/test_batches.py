import torch

from stages import batches
from stages.backbones import Preprocess

PRE = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")


def test_model_input_upsamples_and_normalises_on_the_device():
    images = torch.full((3, 8, 8, 3), 255, dtype=torch.uint8)
    images[:, :, :, 1] = 0
    x = batches.model_input(images, PRE, 20)
    assert x.shape == (3, 3, 20, 20) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor(2.0)) and torch.allclose(x[:, 1], torch.tensor(-2.0))


def test_augment_flips_and_crops_each_image_on_its_own():
    images = torch.arange(4 * 6 * 6 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(4, 6, 6, 3)
    generator = torch.Generator().manual_seed(0)
    flipped = batches.augment(images.repeat(16, 1, 1, 1), flip=True, crop_padding=0, generator=generator)
    plain = images.permute(0, 3, 1, 2).float().div(255).repeat(16, 1, 1, 1)
    is_flipped = (flipped == plain.flip(3)).flatten(1).all(1)
    assert ((flipped == plain).flatten(1).all(1) | is_flipped).all() and 10 < is_flipped.sum() < 54
    cropped = batches.augment(images.repeat(16, 1, 1, 1), flip=False, crop_padding=2, generator=generator)
    assert cropped.shape == plain.shape
    assert not torch.equal(cropped, plain)
    centre = cropped[:, :, 2:4, 2:4]  # a shift of at most 2 px keeps some of the original values
    assert torch.isin(centre, plain).all()


def test_image_inputs_batches_in_order_and_flips_on_request():
    images = torch.randint(0, 256, (5, 4, 4, 3), dtype=torch.uint8)
    plain = torch.cat(list(batches.image_inputs(images, PRE, 4, 2, torch.device("cpu"))))
    flipped = torch.cat(list(batches.image_inputs(images, PRE, 4, 2, torch.device("cpu"), flip=True)))
    assert plain.shape == (5, 3, 4, 4) and torch.equal(flipped, plain.flip(3))
