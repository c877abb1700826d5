"""bf16 autocast against float32 for the frozen body's forward pass on the CPU: speed, then the probe's accuracy.

    python -m benchmarks.bf16_inference speed                     # images/s, interleaved runs
    python -m benchmarks.bf16_inference accuracy --root /tmp/cifar500 --work /tmp/bf16-accuracy

speed: cache-features' forward pass (timm/tf_efficientnet_lite0 with ../shared's weights, 96 px,
batch 64, channels_last, on inputs already made), float32 and bf16 autocast in turn, --repeats
runs of each; the medians of images/s and their min and max.

accuracy: the `best` protocol's feature extraction (L-BFGS probe, data.val_fraction 0.1, flipped
train and test features) on an image folder, with the stages' own functions in one process rather
than through DVC: prepare-data once, the feature cache once per dtype (cpu_bf16: false, then
true), then train-heads and evaluate for each data.train_per_class × seed. Prints each test
accuracy and the mean, std, min and max over the seeds.
"""
import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

from stages.cache_features import prepare_body
from stages.data import inputs
from stages.model import backbones, hardware

REPO = Path(__file__).resolve().parent.parent
LITE0 = REPO.parent / "shared" / "weights" / "tf_efficientnet_lite0.in1k.pth"
MODEL = "timm/tf_efficientnet_lite0"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "accuracy"])
    parser.add_argument("--weights", type=Path, default=LITE0)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6, help="speed: batches per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="speed: timed runs of each dtype")
    parser.add_argument("--root", type=Path, help="accuracy: the image folder (train/, test/)")
    parser.add_argument("--work", type=Path, help="accuracy: a scratch folder for the stages' outputs")
    parser.add_argument("--sizes", default="10,100", help="accuracy: data.train_per_class values")
    parser.add_argument("--seeds", default="0,1,2", help="accuracy: seeds")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 (AVX512-BF16 or AMX): {hardware.cpu_has_bf16()}")
    speed(args) if args.what == "speed" else accuracy(args)


def speed(args) -> None:
    device = torch.device("cpu")
    network = backbones.build(MODEL, str(args.weights), num_classes=10)
    body = prepare_body(network.body, device)
    preprocess = network.preprocess.at(args.image_size, 1.0)
    images = torch.randint(0, 256, (args.batch_size, 32, 32, 3), dtype=torch.uint8)
    ready = inputs.model_input(images, preprocess)
    kinds = {"float32": contextlib.nullcontext, "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}

    @torch.no_grad()
    def run(kind) -> float:
        started = time.perf_counter()
        for _ in range(args.batches):
            with kinds[kind]():
                body(ready)
        return args.batch_size * args.batches / (time.perf_counter() - started)

    for kind in kinds:  # warm-up: oneDNN builds its kernels for each dtype on the first call
        run(kind)
    rates = {kind: [] for kind in kinds}
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits both
        for kind in kinds:
            rates[kind].append(run(kind))
    print(f"\n{MODEL}, {args.image_size} px, batch {args.batch_size}, channels_last, {args.repeats} runs of "
          f"{args.batches} batches each, interleaved\n")
    print("| dtype | images/s, median | min | max |\n|---|---:|---:|---:|")
    for kind, values in rates.items():
        print(f"| {kind} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    ratios = [b / f for f, b in zip(*rates.values())]
    print(f"\nbf16 / float32, median of the pairs' ratios: {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


def accuracy(args) -> None:
    from stages import cache_features, evaluate, prepare_data
    from stages.pipeline import outputs, params
    from stages.study.protocols import overrides
    from stages.training import heads

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    os.chdir(args.work)
    set_params(Path("params.yaml"), {**overrides("best"), "model": MODEL,
                                     "weights": str(args.weights.resolve()), "data.source": "imagefolder",
                                     "data.root": str(args.root.resolve()), "data.image_size": args.image_size})
    prepare_data.main()
    sizes, seeds = [int(s) for s in args.sizes.split(",")], [int(s) for s in args.seeds.split(",")]
    found = {}
    for bf16 in (False, True):
        set_params(Path("params.yaml"), {"cpu_bf16": "auto" if bf16 else False, "data.train_per_class": None})
        started = time.perf_counter()
        cache_features.main()
        print(f"feature cache, cpu_bf16 {bf16}: {time.perf_counter() - started:.1f} s")
        for size in sizes:
            for seed in seeds:
                set_params(Path("params.yaml"), {"data.train_per_class": size, "seed": seed})
                heads.train(params.load())
                evaluate.main()
                found[bf16, size, seed] = outputs.read_json(outputs.METRICS)["test"]["accuracy"]
    print("\n| per class | features | test accuracy per seed | mean ± std | min, max |\n|---:|---|---|---|---|")
    for size in sizes:
        for bf16 in (False, True):
            values = [found[bf16, size, seed] for seed in seeds]
            print(f"| {size} | {'bf16' if bf16 else 'float32'} | {', '.join(f'{v:.4f}' for v in values)} | "
                  f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} | {min(values):.4f}, {max(values):.4f} |")


def set_params(path: Path, changes: dict) -> None:
    """Writes dotted-key changes into a params.yaml, as `dvc exp run -S` would, then validates and records
    them for the stages, as check-inputs does."""
    import yaml
    from stages.pipeline import param_checks, params
    from stages.study.experiments import nest
    path.write_text(yaml.safe_dump(nest(changes, into=yaml.safe_load(path.read_text())), sort_keys=False))
    raw = params.read(path)
    param_checks.validate(raw)
    params.record_checked(raw, path)


if __name__ == "__main__":
    main()
