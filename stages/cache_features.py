"""cache-features: the frozen body runs once over train, val and test; fp16 features to disk.

    python -m stages.cache_features      # or: dvc repro cache-features

Writes data/features/{train,train_flip,val,test,test_flip}.npy (fp16 N×D, memory-mappable,
written as they come; train_flip with features.flip, test_flip with evaluate.flip, for evaluate)
and manifest.json, and data/features_made_from.json (stages/pipeline/feature_cache.py); its time goes to metrics/features.json, never into the data.
With strategy finetune it writes only a note that says so: fine-tuning trains on images, and
DVC's run-cache keeps the features of the other variant (lp_ft shares feature extraction's).
"""
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.data import arrays, inputs, streaming
from stages.model import backbones, devices, hardware
from stages.pipeline import feature_cache, outputs, params, probe_plan
from stages.pipeline.errors import UserError, run_stage

IN_FLIGHT = 3  # batches whose copy to the host and disk write may still be running


def main():
    p = params.load()
    if not probe_plan.probes(p.probes):
        outputs.write_skipped(outputs.FEATURES, "the strategy trains no probe")
        outputs.write_json(outputs.FEATURE_METRICS, {"time_s": 0.0, "images_per_s": 0.0})
        outputs.write_json(outputs.FEATURES_MADE_FROM, {})
        return
    outputs.require(outputs.PREPARED / "manifest.json")
    made_from = feature_cache.made_from(p)  # before any output is touched
    outputs.fresh_folder(outputs.FEATURES)
    device = devices.setup(p.device)
    bf16 = hardware.bf16_on_cpu(p.cpu_bf16)
    network = backbones.build(p.model, p.model_weights, arrays.num_classes(outputs.PREPARED))
    body = prepare_body(network.body, device)
    flips = {"train": p.features.flip, "val": False, "test": p.evaluate.flip}
    jobs = [(split, flip) for split in arrays.SPLITS for flip in (False, True) if flips[split] or not flip]
    images = {split: arrays.open_split(outputs.PREPARED, split)[0] for split in arrays.SPLITS}
    preprocess = network.preprocess.at(p.data.image_size, p.data.crop_pct)
    dim = feature_dim(body, preprocess, device)
    check_free_space(outputs.FEATURES, sum(len(images[split]) for split, _ in jobs) * dim * 2)
    fast_body = devices.maybe_compile(body, p.compile)
    splits, started = {}, time.perf_counter()
    for split, flip in jobs:
        name = split + ("_flip" if flip else "")
        split_images = images[split]
        batches = streaming.split_inputs(split_images, preprocess, p.features.batch_size, device, flip=flip)
        write_features(fast_body, batches, len(split_images), p.features.batch_size, dim, outputs.FEATURES / f"{name}.npy",
                       device, name, bf16)
        splits[name] = [len(split_images), dim]
    seconds = time.perf_counter() - started
    total = sum(count for count, _ in splits.values())
    feature_cache.write(p, made_from, splits, hardware.precision(device, bf16), device.type,
                        head_is_linear=isinstance(network.head, torch.nn.Linear))
    outputs.write_json(outputs.FEATURE_METRICS, {"time_s": round(seconds, 2), "images_per_s": round(total / seconds, 1)})
    print(f"cached {total} feature vectors of {dim} values at {total / seconds:.1f} images/s on {device}"
          f"{' (bf16 autocast)' if bf16 else ''}")


def prepare_body(body: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return devices.place(body.eval().requires_grad_(False), device)


@torch.no_grad()
def feature_dim(body, preprocess: inputs.Preprocess, device) -> int:
    x = inputs.model_input(torch.zeros(1, 8, 8, 3, dtype=torch.uint8, device=device), preprocess)
    return body(x).flatten(1).shape[1]


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"the feature cache needs {needed / 1e9:.2f} GB in {folder}/, but only {free / 1e9:.2f} GB "
                        "is free: free some space, or lower data.image_size, or set features.flip: false")


@torch.no_grad()
def write_features(body, batches, count: int, batch_size: int, dim: int, path: Path, device, desc: str,
                   cpu_bf16: bool = False) -> None:
    """Streams fp16 features into a .npy file as they come: its header, then each batch's rows in
    order. On the GPU the copy to (pinned) host memory is asynchronous and a writer thread waits
    for it and writes, so the GPU never waits for the disk; on the CPU each batch is written in
    line, since a thread beside torch's own would take a core from them. Memory does not grow
    with `count`."""
    header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (count, dim)}
    pending = deque()
    # One fp16 buffer for every batch: flattening and converting the body's (channels_last) output
    # is one copy into it, and no batch allocates (on the CPU, fresh pages cost 3 % of AlexNet's forward).
    # On the GPU the next batch's copy into it is queued after this one's copy to the host.
    flat = torch.empty((batch_size, dim), dtype=torch.float16, device=device)
    with open(path, "wb") as file, ThreadPoolExecutor(1) as writer:
        np.lib.format.write_array_header_1_0(file, header)
        for x, rows in tqdm(batches, desc=desc, total=-(-count // batch_size), unit="batch", mininterval=2):
            with devices.autocast(device, cpu_bf16):
                out = body(x)
            batch = flat.view(out.shape).copy_(out).view(batch_size, dim)[:rows]
            if device.type != "cuda":
                file.write(batch.numpy())
                continue
            host = batch.to("cpu", non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            pending.append(writer.submit(store, file, host, copied))
            while len(pending) > IN_FLIGHT:
                pending.popleft().result()
        for future in pending:
            future.result()


def store(file, batch: torch.Tensor, copied) -> None:
    copied.synchronize()
    file.write(batch.numpy())


if __name__ == "__main__":
    run_stage(main)
