"""Images/s of the cache-features path against a bare forward pass of the same body.

    python -m benchmarks.cache_features_speed                       # timm/tf_efficientnet_lite0, 96 px
    python -m benchmarks.cache_features_speed --model alexnet --image-size 224 --batch-size 256

Both sides use the same body, batch size, resolution, autocast dtype and threads. The
cache-features side starts from uint8 32×32 images on the host and includes the resize, the
center crop (--crop-pct, the notebook's 0.875 by default), the normalisation, the
device-to-host copy and the fp16 .npy write; the bare side feeds a ready-made input already on
the device. Runs alternate, and the medians are compared.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages.data import inputs, streaming
from stages.model import backbones, devices, hardware
from stages.cache_features import feature_dim, prepare_body, write_features


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="imagenet, none or a state_dict file")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--crop-pct", type=float, default=0.875, help="resize to size / crop_pct, center-crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the body, as compile: true does")
    args = parser.parse_args()

    device = devices.setup(args.device)
    network = backbones.build(args.model, args.weights, num_classes=10)
    body = devices.maybe_compile(prepare_body(network.body, device), args.compile)
    preprocess = network.preprocess.at(args.image_size, args.crop_pct)
    dim = feature_dim(body, preprocess, device)
    count = args.batch_size * args.batches
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8)
    ready = inputs.model_input(images[:args.batch_size].to(device), preprocess)

    @torch.no_grad()
    def bare() -> float:
        started = time.perf_counter()
        for _ in range(args.batches):
            with devices.autocast(device):
                body(ready)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return count / (time.perf_counter() - started)

    def cached(mapped: np.ndarray, path: Path) -> float:
        started = time.perf_counter()
        batches = streaming.split_inputs(mapped, preprocess, args.batch_size, device)  # as the stage reads a split
        write_features(body, batches, count, args.batch_size, dim, path, device, desc="cache")
        return count / (time.perf_counter() - started)  # write_features returns once the file is written

    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "images.npy", images.numpy())
        mapped = np.load(Path(folder) / "images.npy", mmap_mode="c")
        bare(), cached(mapped, Path(folder) / "warmup.npy")  # cuDNN autotuning, torch.compile, first allocations
        bare_rates, cached_rates = [], []
        for _ in range(args.repeats):
            bare_rates.append(bare())
            cached_rates.append(cached(mapped, Path(folder) / "features.npy"))
    bare_rate, cached_rate = statistics.median(bare_rates), statistics.median(cached_rates)
    print(f"{args.model} at {args.image_size} px (crop_pct {args.crop_pct}), batch {args.batch_size}, "
          f"{hardware.describe(device)}")
    print(f"bare forward:   {bare_rate:8.1f} images/s")
    print(f"cache-features: {cached_rate:8.1f} images/s")
    print(f"ratio:          {cached_rate / bare_rate:8.3f}")


if __name__ == "__main__":
    main()
