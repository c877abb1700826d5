"""Images/s of the cache-features path against a bare forward pass of the same body.

    python benchmarks/cache_features_speed.py                       # timm/tf_efficientnet_lite0, 96 px
    python benchmarks/cache_features_speed.py --model alexnet --image-size 224 --batch-size 256

Both sides use the same body, batch size, resolution, autocast dtype and threads. The
cache-features side starts from uint8 32×32 images on the host and includes the upsample,
the normalisation, the device-to-host copy and the fp16 .npy write; the bare side feeds a
ready-made input tensor already on the device. Runs alternate, and the medians are compared.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stages import backbones, batches
from stages.cache_features import prepare_body, write_features


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="imagenet, none or a state_dict file")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = batches.setup(args.device, seed=0)
    network = backbones.build(args.model, args.weights, num_classes=10)
    body = prepare_body(network.body, device)
    count = args.batch_size * args.batches
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8)
    ready = batches.model_input(images[:args.batch_size].to(device), network.preprocess, args.image_size)

    @torch.no_grad()
    def bare() -> float:
        started = time.perf_counter()
        for _ in range(args.batches):
            with batches.autocast(device):
                body(ready).flatten(1).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return count / (time.perf_counter() - started)

    def cached(path: Path) -> float:
        started = time.perf_counter()
        inputs = batches.image_inputs(images, network.preprocess, args.image_size, args.batch_size, device)
        write_features(body, inputs, count, args.batch_size, path, device, desc="cache")
        return count / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as folder:
        bare(), cached(Path(folder) / "warmup.npy")
        bare_rates, cached_rates = [], []
        for _ in range(args.repeats):
            bare_rates.append(bare())
            cached_rates.append(cached(Path(folder) / "features.npy"))
    bare_rate, cached_rate = statistics.median(bare_rates), statistics.median(cached_rates)
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"bare forward:   {bare_rate:8.1f} images/s")
    print(f"cache-features: {cached_rate:8.1f} images/s")
    print(f"ratio:          {cached_rate / bare_rate:8.3f}")


if __name__ == "__main__":
    main()
