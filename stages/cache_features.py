"""cache-features: the frozen body runs once over train, val and test; fp16 features to disk.

    python -m stages.cache_features      # or: dvc repro cache-features

Writes data/features/{train,train_flip,val,test}.npy (fp16 N×D, memory-mappable, written as
they come) and manifest.json. With strategy=finetune it writes only a manifest that says so:
fine-tuning trains on images, and DVC's run-cache keeps the features of the other variant.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages import backbones, batches, data, params

PREPARED = Path("data/prepared")
OUT = Path("data/features")


def main():
    p = params.load()
    if not params.start_strategy_stage(OUT, p, "feature_extraction"):
        return
    device = batches.setup(p.device, p.seed)
    network = backbones.build(p.model, p.weights, data.num_classes(PREPARED))
    body = prepare_body(network.body, device)
    splits, seconds = {}, 0.0
    jobs = [("train", False), ("train", True), ("val", False), ("test", False)]
    for split, flip in jobs:
        if flip and not p.features.flip:
            continue
        name = split + ("_flip" if flip else "")
        images = torch.from_numpy(data.load_split(PREPARED, split)[0])
        inputs = batches.image_inputs(images, network.preprocess, p.data.image_size, p.features.batch_size,
                                      device, flip=flip)
        started = time.perf_counter()
        shape = write_features(body, inputs, len(images), p.features.batch_size, OUT / f"{name}.npy", device, name)
        seconds += time.perf_counter() - started
        splits[name] = list(shape)
    total = sum(shape[0] for shape in splits.values())
    write_manifest({"model": p.model, "weights": p.weights, "image_size": p.data.image_size,
                    "dtype": "float16", "splits": splits, "device": device.type,
                    "images_per_s": round(total / seconds, 1)})
    print(f"cached {total} feature vectors of {shape[1]} values at {total / seconds:.1f} images/s on {device}")


def prepare_body(body: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return batches.place(body.eval().requires_grad_(False), device)


@torch.no_grad()
def write_features(body, inputs, count: int, batch_size: int, path: Path, device, desc: str) -> tuple[int, int]:
    """Streams fp16 features to a .npy file, batch by batch: memory does not grow with `count`."""
    features = None
    start = 0
    for x in tqdm(inputs, desc=desc, total=math.ceil(count / batch_size), unit="batch", mininterval=2):
        with batches.autocast(device):
            batch = body(x).flatten(1).to(torch.float16).cpu().numpy()
        if features is None:
            features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(count, batch.shape[1]))
        features[start:start + len(batch)] = batch
        start += len(batch)
    features.flush()
    return features.shape


def write_manifest(manifest: dict) -> None:
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    params.run_stage(main)
