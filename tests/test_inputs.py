from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from stages.data import arrays, augment, inputs, streaming
from stages.pipeline import param_checks, params
from stages.training import finetuning
from tests.conftest import CIFAR_JPEG, needs_shared, unpack_cifar_jpeg

PRE = inputs.Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")


def test_model_input_resizes_and_normalises_on_the_device():
    images = torch.full((3, 8, 8, 3), 255, dtype=torch.uint8)
    images[:, :, :, 1] = 0
    x = inputs.model_input(images, PRE.at(20))
    assert x.shape == (3, 3, 20, 20) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[:, 0], torch.tensor(2.0)) and torch.allclose(x[:, 1], torch.tensor(-2.0))


def interpolate_crop_normalise(images, preprocess, size, crop_pct):
    """model_input the plain way: F.interpolate, slice, normalise."""
    x = images.permute(0, 3, 1, 2).float() / 255
    side = params.resize_side(size, crop_pct)
    exact = {} if preprocess.interpolation == "nearest" else {"align_corners": False, "antialias": side < x.shape[-1]}
    x = F.interpolate(x, size=(side, side), mode=preprocess.interpolation, **exact).clamp(0, 1)
    top = int(round((side - size) / 2.0))
    x = x[:, :, top:top + size, top:top + size]
    return (x - torch.tensor(preprocess.mean).view(3, 1, 1)) / torch.tensor(preprocess.std).view(3, 1, 1)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("stored, size, crop_pct", [(32, 224, 0.875), (32, 64, 1.0), (96, 40, 0.9), (20, 20, 1.0)])
def test_the_matrix_resize_equals_interpolate_then_crop(interpolation, stored, size, crop_pct):
    images = torch.randint(0, 256, (3, stored, stored, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    preprocess = inputs.Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation)
    ours = inputs.model_input(images, preprocess.at(size, crop_pct))
    assert ours.shape == (3, 3, size, size) and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(ours, interpolate_crop_normalise(images, preprocess, size, crop_pct), atol=1e-5)


def test_crop_pct_resizes_then_takes_the_centre():
    images = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    images[:, :, :4] = 255  # a bright band at the left edge: outside a 0.5 centre crop
    plain = inputs.model_input(images, PRE.at(64, 1.0))
    cropped = inputs.model_input(images, PRE.at(64, 0.5))
    assert plain.shape == cropped.shape == (1, 3, 64, 64)
    assert plain[0, 0, :, 0].max() > 1.5 and cropped[0, 0].max() < -1.9
    assert params.resize_side(224, 0.875) == 256


def torchvision_reference(pil_images):
    """What the study's notebook fed AlexNet and VGG16: torchvision's weights.transforms() on PIL images."""
    transforms = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.transforms()  # Resize(256), CenterCrop(224)
    preprocess = inputs.Preprocess(tuple(transforms.mean), tuple(transforms.std), transforms.interpolation.value)
    reference = torch.stack([transforms(image) for image in pil_images])
    batch = torch.from_numpy(np.stack([np.array(image) for image in pil_images]))
    return inputs.model_input(batch, preprocess.at(224, 0.875)), reference, min(transforms.std)


def assert_matches_torchvision(pil_images):
    ours, reference, std = torchvision_reference(pil_images)
    assert ours.shape == reference.shape == (len(pil_images), 3, 224, 224)
    difference = (ours - reference).abs()
    one_level = 1 / 255 / std  # PIL rounds its resized image to uint8; we keep floats
    assert difference.max() <= one_level + 1e-4 and difference.mean() < one_level / 2


@needs_shared(CIFAR_JPEG)
def test_resize_and_crop_match_torchvisions_weights_transforms_on_cifar_images(tmp_path):
    root = unpack_cifar_jpeg(tmp_path, per_class=2)
    paths = sorted(root.glob("test/*/*.jpg"))
    assert len(paths) == 20
    assert_matches_torchvision([Image.open(path).convert("RGB") for path in paths])


def test_resize_and_crop_match_torchvisions_weights_transforms_on_generated_images():
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (4, 4, 4, 3)).repeat(8, 1).repeat(8, 2).astype(np.uint8)
    assert_matches_torchvision([Image.fromarray(image) for image in smooth])


def test_a_padded_last_batch_gives_the_outputs_of_an_unpadded_one():
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    batches = list(inputs.image_inputs(images, PRE.at(16, 1.0), 4, torch.device("cpu")))
    assert [(x.shape[0], count) for x, count in batches] == [(4, 4), (4, 1)]  # one shape for every batch
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    with torch.no_grad():
        padded_last = conv(batches[1][0])[:1]
        unpadded = conv(inputs.model_input(images[4:], PRE.at(16)))
    assert torch.allclose(padded_last, unpadded, atol=1e-6)


def test_image_inputs_batches_in_order_and_flips_on_request():
    images = torch.randint(0, 256, (5, 4, 4, 3), dtype=torch.uint8)
    cpu = torch.device("cpu")
    plain = torch.cat([x[:n] for x, n in inputs.image_inputs(images, PRE.at(4, 1.0), 2, cpu)])
    flipped = torch.cat([x[:n] for x, n in inputs.image_inputs(images, PRE.at(4, 1.0), 2, cpu, flip=True)])
    assert plain.shape == (5, 3, 4, 4) and torch.equal(flipped, plain.flip(3))


def test_augment_flips_and_crops_each_image_on_its_own():
    images = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = images.repeat(16, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    flipped = augment.augment(batch, flip=True, crop_padding=0, generator=generator)
    is_flipped = (flipped == batch.flip(2)).flatten(1).all(1)
    assert ((flipped == batch).flatten(1).all(1) | is_flipped).all() and 10 < is_flipped.sum() < 54
    cropped = augment.augment(batch, flip=False, crop_padding=2, generator=generator)
    assert cropped.shape == batch.shape and cropped.dtype == torch.uint8 and not torch.equal(cropped, batch)
    padded = F.pad(batch.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode="reflect").permute(0, 2, 3, 1)
    crops = padded.unfold(1, 6, 1).unfold(2, 6, 1).permute(0, 1, 2, 4, 5, 3)  # N × 5 × 5 × 6 × 6 × 3: every crop
    matches = (crops == cropped.float()[:, None, None]).flatten(3).all(3)
    assert matches.flatten(1).any(1).all()  # each image is one crop of its reflect-padded self
    assert len({tuple(m.nonzero()[0].tolist()) for m in matches}) > 5  # at different offsets


def test_finetune_batches_keep_or_drop_the_partial_last_batch_and_split_across_processes():
    images = torch.randint(0, 256, (70, 8, 8, 3), dtype=torch.uint8)
    labels = torch.arange(70)
    p = param_checks.load()

    def batches(cfg, rank=0, world=1):
        generator = torch.Generator().manual_seed(0)
        return list(finetuning.train_batches(images, labels, cfg, PRE.at(16), generator, rank, world))

    for drop_last, sizes in ((False, [32, 32, 6]), (True, [32, 32])):
        cfg = replace(p.finetune, batch_size=32, drop_last=drop_last, flip=True, crop_padding=2)
        epoch = batches(cfg)
        assert [len(y) for _, y in epoch] == sizes and len(sizes) == cfg.steps_per_epoch(len(labels))
        assert all(x.shape == (len(y), 3, 16, 16) for x, y in epoch)
        assert len(torch.cat([y for _, y in epoch]).unique()) == sum(sizes)  # shuffled, none repeated
    shares = [batches(cfg, rank, 2) for rank in (0, 1)]
    for (x0, y0), (x1, y1), (x, y) in zip(*shares, epoch):
        assert len(y0) == len(y1) == 16 and torch.equal(torch.cat([y0, y1]), y)
        assert torch.allclose(torch.cat([x0, x1]), x)  # the same flips and crops in both processes


def test_a_memory_mapped_split_gives_the_batches_of_the_same_images_in_memory(tmp_path):
    images = torch.randint(0, 256, (37, 8, 8, 3), dtype=torch.uint8)
    np.save(tmp_path / "x_images.npy", images.numpy())
    np.save(tmp_path / "x_labels.npy", np.arange(37))
    mapped, labels = arrays.open_split(tmp_path, "x")
    cpu = torch.device("cpu")
    from_file = [(x.clone(), n) for x, n in streaming.split_inputs(mapped, PRE.at(8, 1.0), 16, cpu, flip=True)]
    in_memory = list(inputs.image_inputs(images, PRE.at(8, 1.0), 16, cpu, flip=True))
    assert [n for _, n in from_file] == [16, 16, 5] == [n for _, n in in_memory]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(from_file, in_memory))
    assert torch.equal(inputs.to_device(mapped, cpu), images) and inputs.to_device(labels, cpu).tolist() == list(range(37))


def test_read_rows_of_a_view_of_a_mapped_split_are_the_views_rows(tmp_path):
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    np.save(tmp_path / "x_images.npy", images)
    np.save(tmp_path / "x_labels.npy", np.arange(10))
    mapped, _ = arrays.open_split(tmp_path, "x")
    out = np.zeros((4, 2, 2, 3), dtype=np.uint8)
    assert np.array_equal(arrays.read_rows(mapped, 2, out), images[2:6])  # read from the file
    assert np.array_equal(arrays.read_rows(mapped[5:], 2, out), images[7:10])  # a view: its own rows
