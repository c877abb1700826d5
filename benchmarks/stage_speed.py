"""Images/s of each stage's code path on this device, against a bare loop on the same tensors.

    python -m benchmarks.stage_speed 2>/dev/null                  # --size small: CI-sized, CPU, about 4 min
    python -m benchmarks.stage_speed --size full 2>/dev/null      # GPU: alexnet, vgg16, lite0 at 224 px, bf16
    python -m benchmarks.stage_speed --size full --models vgg16 --compile

Random weights (throughput does not depend on their values) and N synthetic uint8 32×32
images. The stages' own settings come from params.yaml: batch sizes, optimizers, crop_pct,
finetune.unfreeze, train_heads.trainable. Each stage's functions are called as the stage calls
them, on the N images:

    cache-features  streaming.split_inputs + cache_features.write_features: a mapped .npy -> fp16 .npy
    train-heads     loop.fit on heads.feature_batches of fp16 features on the device
    finetune        loop.fit on finetune's batches (augment, model_input), checkpoints as params.yaml sets them
    evaluate        streaming.split_inputs + inference.predict: a mapped .npy -> logits on the host

The training stages run 2 epochs per timed run, so that what loop.fit does between epochs (state
copies, logs, and checkpoints when finetune.checkpoint_interval_s has passed) counts as it does in
a real run. The bare loop runs the same module on
ready-made device tensors, with the same number of batches, batch size, optimizer, dtype and
threads: a forward pass (cache-features, evaluate), or forward, backward and optimizer step
(train-heads, finetune). Runs alternate; the ratio is the median of each pair's ratio.

Then feature extraction as a whole, over --epochs epochs, against the naive way of the study's
notebook: a torch DataLoader with per-image PIL Resize(round(size / crop_pct)), CenterCrop,
ToTensor and Normalize, the backbone run on every image in every epoch, the last Linear
trained; ours caches the features once, then trains the head on them. Both use the same device,
dtype, batch size and optimizer, and no torch.compile.
"""
import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stages.data import inputs, streaming
from stages.model import backbones, devices, hardware, inference
from stages.pipeline import param_checks
from stages.training import finetuning, heads, loop
from stages.training.checkpoints import Checkpoints
from stages.cache_features import feature_dim, prepare_body, write_features
from stages.training.heads import feature_batches, load_features

SIZES = {"small": {"models": "alexnet", "image_size": 64, "images": 1024},  # 4 batches of 256 per split
         "full": {"models": "alexnet,vgg16,timm/tf_efficientnet_lite0", "image_size": 224, "images": 20480}}
TIMED_EPOCHS = 2  # of the training stages, per timed run
READY_BATCHES = 4  # distinct ready-made batches that the bare loops cycle through
MIN_SECONDS = 15.0  # timed per side and stage: quick stages repeat until medians are steady on a shared machine
NAIVE_WORKERS = 2  # DataLoader workers of the naive way on the GPU; on the CPU they would take the compute's cores


class Runs(NamedTuple):
    ours: Callable[[], None]
    bare: Callable[[], None]
    passes: int  # passes over the images in one run
    reset: Callable[[], None] = lambda: None  # untimed, before each run of ours: what DVC does before a stage


@dataclass
class Setup:
    device: torch.device
    image_size: int
    crop_pct: float
    compile: bool
    batch_size: int | None  # None: each stage's own, from params.yaml
    folder: Path  # scratch: feature files, DVCLive logs, checkpoints
    mapped: np.ndarray | None = None  # the images as the stages read a split: memory-mapped from an .npy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--models", help="comma-separated; default: alexnet (small), alexnet,vgg16,lite0 (full)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="for every stage; default: each stage's from params.yaml")
    parser.add_argument("--compile", action="store_true", help="torch.compile, as compile: true does")
    parser.add_argument("--images", type=int, help="N; default 1024 (small), 20480 (full)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the naive-against-ours comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side at least, after a warm-up")
    args = parser.parse_args()
    size = SIZES[args.size]
    p = param_checks.load()
    device = devices.setup(args.device)
    n = args.images or size["images"]
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    dtype = "bf16 autocast" if device.type == "cuda" else "float32"
    print(f"{hardware.describe(device)}, {dtype}, {n} images of 32 px -> {size['image_size']} px "
          f"(crop_pct {p.data.crop_pct}), compile {args.compile}")

    rows, naive_rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "images.npy", images.numpy())
        s = Setup(device, size["image_size"], p.data.crop_pct, args.compile, args.batch_size, Path(folder),
                  np.load(Path(folder) / "images.npy", mmap_mode="c"))
        for model in (args.models or size["models"]).split(","):
            for stage, runs in (("cache-features", cache_features_runs), ("train-heads", train_heads_runs),
                                ("finetune", finetune_runs), ("evaluate", evaluate_runs)):
                run = runs(backbones.build(model, "none", 10), images, labels, p, s)
                ours_s, bare_s, ratio = compare(run, args.repeats, device)
                rows.append((stage, model, run.passes * n / ours_s, run.passes * n / bare_s, ratio))
                print_row(*rows[-1])
            naive_s = naive_feature_extraction(backbones.build(model, "none", 10), images, labels, p, s, args.epochs)
            ours_s = our_feature_extraction(backbones.build(model, "none", 10), images, labels, p, s, args.epochs)
            naive_rows.append((model, naive_s, ours_s))
    print_tables(rows, naive_rows, n, args.epochs)


def batch_of(s: Setup, stage_batch_size: int) -> int:
    return s.batch_size or stage_batch_size


def cache_features_runs(network, images, labels, p, s):
    batch = batch_of(s, p.features.batch_size)
    body = devices.maybe_compile(prepare_body(network.body, s.device), s.compile)
    dim = feature_dim(body, network.preprocess.at(s.image_size, s.crop_pct), s.device)
    ready = ready_inputs(images, network.preprocess, s, batch)

    path = s.folder / "features.npy"

    def ours():
        batches = streaming.split_inputs(s.mapped, network.preprocess.at(s.image_size, s.crop_pct), batch, s.device)
        write_features(body, batches, len(images), batch, dim, path, s.device, "cache")

    # DVC removes a stage's outputs before it runs; truncating the last run's file instead took
    # 5 ms per 9.4 MB here, 2.5 % of a 512-image run.
    return Runs(ours, lambda: bare_forward(body, ready, math.ceil(len(images) / batch), s.device), 1,
                reset=lambda: path.unlink(missing_ok=True))


def train_heads_runs(network, images, labels, p, s):
    cfg = replace(p.train_heads, epochs=TIMED_EPOCHS, batch_size=batch_of(s, p.train_heads.batch_size))
    heads.set_head_trainable(network.head, cfg.trainable)
    head = network.head.to(s.device)
    dim = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
    features = torch.rand(len(images), dim, device=s.device).half()  # what load_features puts on the device
    targets = labels.to(s.device)
    groups = [{"params": [t for t in head.parameters() if t.requires_grad], "lr": cfg.lr}]

    def ours():
        loop.fit(loop.Training(head, groups, lambda generator: feature_batches(
                     features, None, targets, cfg.batch_size, generator), len(targets)),
                 cfg, p.seed, s.device, s.folder / "live")

    ready = list(zip(features[:cfg.batch_size * READY_BATCHES].float().split(cfg.batch_size),
                     targets[:cfg.batch_size * READY_BATCHES].split(cfg.batch_size)))
    steps = TIMED_EPOCHS * cfg.steps_per_epoch(len(images))
    return Runs(ours, lambda: bare_training(head, groups, cfg, ready, steps, s.device), TIMED_EPOCHS)


def finetune_runs(network, images, labels, p, s):
    cfg = replace(p.finetune, epochs=TIMED_EPOCHS, batch_size=batch_of(s, p.finetune.batch_size))
    finetuning.set_trainable(network, cfg.unfreeze)
    model = devices.place(network.model, s.device)
    groups = finetuning.parameter_groups(network, cfg)
    fast_model = devices.maybe_compile(model, s.compile)
    train_images, train_labels = images.to(s.device), labels.to(s.device)

    def ours():
        checkpoints = Checkpoints(s.folder / "checkpoints", "benchmark", cfg.checkpoint_interval_s)
        loop.fit(loop.Training(fast_model, groups, lambda generator: finetuning.train_batches(
                     train_images, train_labels, cfg, network.preprocess.at(s.image_size, s.crop_pct), generator),
                     len(train_labels), state_of=model),
                 cfg, p.seed, s.device, s.folder / "live", checkpoints)
        checkpoints.remove()  # as the stage does at its end; else the next run resumes

    ready = list(zip(ready_inputs(images, network.preprocess, s, cfg.batch_size),
                     train_labels[:cfg.batch_size * READY_BATCHES].split(cfg.batch_size)))
    steps = TIMED_EPOCHS * cfg.steps_per_epoch(len(images))
    return Runs(ours, lambda: bare_training(fast_model, groups, cfg, ready, steps, s.device), TIMED_EPOCHS)


def evaluate_runs(network, images, labels, p, s):
    batch = batch_of(s, p.evaluate.batch_size)
    model = devices.maybe_compile(devices.place(network.model, s.device), s.compile)
    ready = ready_inputs(images, network.preprocess, s, batch)

    def ours():
        batches = streaming.split_inputs(s.mapped, network.preprocess.at(s.image_size, s.crop_pct), batch, s.device)
        inference.predict(model, batches, s.device)

    return Runs(ours, lambda: bare_forward(model.eval(), ready, math.ceil(len(images) / batch), s.device), 1)


def ready_inputs(images, preprocess, s: Setup, batch: int) -> list[torch.Tensor]:
    """Model inputs made once, on the device: the bare loops' data."""
    return [x for x, _ in inputs.image_inputs(images[:batch * READY_BATCHES], preprocess.at(s.image_size, s.crop_pct), batch, s.device)]


@torch.no_grad()
def bare_forward(module, ready, steps, device) -> None:
    for step in range(steps):
        with devices.autocast(device):
            module(ready[step % len(ready)])


def bare_training(model, groups, cfg, ready, steps, device) -> None:
    model.train()
    loop.keep_norms_in_eval(model)
    optimizer = loop.make_optimizer(cfg, groups)
    for step in range(steps):
        x, y = ready[step % len(ready)]
        with devices.autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def compare(run: Runs, repeats: int, device) -> tuple[float, float, float]:
    """Median seconds of each side and the median of the paired ratios (bare / ours), after one
    warm-up run of each (cuDNN, torch.compile, caches): at least `repeats` pairs, and more until
    each side has run MIN_SECONDS. Pairing cancels a shared machine's drift; each pair's order
    alternates."""
    def ours() -> float:
        run.reset()
        return timed(run.ours, device)

    ours(), timed(run.bare, device)
    ours_s, bare_s = [], []
    while len(ours_s) < repeats or min(sum(ours_s), sum(bare_s)) < MIN_SECONDS:
        if len(ours_s) % 2:
            bare_s.append(timed(run.bare, device))
            ours_s.append(ours())
        else:
            ours_s.append(ours())
            bare_s.append(timed(run.bare, device))
    ratios = [b / o for o, b in zip(ours_s, bare_s)]
    return statistics.median(ours_s), statistics.median(bare_s), statistics.median(ratios)


def timed(run, device) -> float:
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


class PILImages(torch.utils.data.Dataset):
    """The notebook's data: one PIL image at a time through torchvision transforms."""
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.numpy(), labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def naive_feature_extraction(network, images, labels, p, s: Setup, epochs: int) -> float:
    """Seconds for `epochs` epochs of the last Linear, the frozen backbone run on every image each time."""
    from torchvision import transforms
    cfg = replace(p.train_heads, batch_size=batch_of(s, p.train_heads.batch_size))
    transform = transforms.Compose([transforms.Resize(round(s.image_size / s.crop_pct)),
                                    transforms.CenterCrop(s.image_size), transforms.ToTensor(),
                                    transforms.Normalize(network.preprocess.mean, network.preprocess.std)])
    on_gpu = s.device.type == "cuda"
    batches = torch.utils.data.DataLoader(PILImages(images, labels, transform), batch_size=cfg.batch_size,
                                          shuffle=True, num_workers=NAIVE_WORKERS if on_gpu else 0)
    network.body.requires_grad_(False)
    heads.set_head_trainable(network.head, "last")
    model = devices.place(network.model, s.device)
    started = time.perf_counter()
    optimizer = loop.make_optimizer(cfg, [{"params": [t for t in model.parameters() if t.requires_grad],
                                           "lr": cfg.lr}])
    for _ in range(epochs):
        model.train()
        loop.keep_norms_in_eval(model)
        for x, y in batches:
            x, y = x.to(s.device), y.to(s.device)
            with devices.autocast(s.device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def our_feature_extraction(network, images, labels, p, s: Setup, epochs: int) -> float:
    """Seconds for cache-features once (to an .npy), then train-heads' `epochs` epochs on the file's features."""
    cfg = replace(p.train_heads, epochs=epochs, batch_size=batch_of(s, p.train_heads.batch_size))
    batch, path = batch_of(s, p.features.batch_size), s.folder / "train.npy"
    started = time.perf_counter()
    body = prepare_body(network.body, s.device)
    dim = feature_dim(body, network.preprocess.at(s.image_size, s.crop_pct), s.device)
    batches = streaming.split_inputs(s.mapped, network.preprocess.at(s.image_size, s.crop_pct), batch, s.device)
    write_features(body, batches, len(images), batch, dim, path, s.device, "cache")
    features, targets = load_features(path, s.device), labels.to(s.device)
    heads.set_head_trainable(network.head, "last")
    head = network.head.to(s.device)
    groups = [{"params": [t for t in head.parameters() if t.requires_grad], "lr": cfg.lr}]
    loop.fit(loop.Training(head, groups, lambda generator: feature_batches(
                 features, None, targets, cfg.batch_size, generator), len(targets)),
             cfg, p.seed, s.device, s.folder / "live")
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def print_row(stage, model, ours, bare, ratio) -> None:
    print(f"  {stage}, {model}: {ours:.1f} images/s ours, {bare:.1f} bare, ratio {ratio:.3f}", flush=True)


def print_tables(rows, naive_rows, n: int, epochs: int) -> None:
    print("\n| stage | model | images/s ours | images/s bare | ratio (paired median) |\n|---|---|---:|---:|---:|")
    for stage, model, ours, bare, ratio in rows:
        print(f"| {stage} | {model} | {ours:.1f} | {bare:.1f} | {ratio:.3f} |")
    print(f"\nFeature extraction, {n} images, {epochs} epochs of the head:\n"
          f"| model | naive s (backbone every epoch, PIL DataLoader) | ours s (cache once + head) | speed-up |\n"
          f"|---|---:|---:|---:|")
    for model, naive_s, ours_s in naive_rows:
        print(f"| {model} | {naive_s:.2f} | {ours_s:.2f} | {naive_s / ours_s:.1f}x |")


if __name__ == "__main__":
    main()
