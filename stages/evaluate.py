"""evaluate: the trained model's test accuracy, loss and figures; the cell's whole cost.

    python -m stages.evaluate            # or: dvc repro evaluate

Both strategies are measured on the same test images with the same preprocessing. Fine-tuning
runs its whole model on them. Feature extraction's body is frozen, so cache-features already ran
it over the test images (and their mirror images, with evaluate.flip): the head runs on those
cached features, once the cache is shown to come from the data, code, weights and params that
cache-features would read now (stages/pipeline/feature_cache.py), and builds no backbone where the
head is one Linear. evaluate.flip averages each image's logits with its mirror image's. Writes
metrics/metrics.json (test accuracy and loss, and the whole cell's cost: the feature cache's time,
training's and evaluation's, each recorded by its own stage), plots/data/ for `dvc plots`
(per-class accuracy too), and PNGs.
"""

import os
import time

import numpy as np
import torch

from stages.data import arrays, streaming
from stages.model import backbones, devices, hardware, inference, probe_layers
from stages.pipeline import feature_cache, figures, outputs, params, trained
from stages.pipeline.errors import UserError, run_stage

GRID_IMAGES = 32  # test images in the predictions figure


def main():
    p = params.load()
    feature_extraction = p.strategy == "feature_extraction"
    outputs.require(outputs.PREPARED / "manifest.json", outputs.TRAINED[p.strategy], trained.summary_file(p.strategy),
                    outputs.FEATURE_METRICS,
                    *([feature_cache.MANIFEST, outputs.FEATURES_MADE_FROM] if feature_extraction else []),
                    *([trained.summary_file("feature_extraction")] if p.strategy == "lp_ft" else []))
    device = devices.setup(p.device)
    bf16 = hardware.bf16_on_cpu(p.cpu_bf16)
    classes = arrays.load_manifest(outputs.PREPARED)["classes"]
    images, labels = arrays.open_split(outputs.PREPARED, "test")
    if feature_extraction:
        head = probe_layers.probe_head(p, len(classes))
        trained.load_into(head, p.strategy)
        started = time.perf_counter()
        feature_cache.check_current(p)
        logits = cached_logits(head, p.evaluate.flip, len(labels), device, bf16)
    else:
        network = backbones.build(p.model, p.model_weights, len(classes))
        trained.load_into(network.model, p.strategy)
        model = devices.maybe_compile(devices.place(network.model, device), p.compile)
        preprocess = network.preprocess.at(p.data.image_size, p.data.crop_pct)
        started = time.perf_counter()
        logits = {flip: inference.predict(model, streaming.split_inputs(images, preprocess, p.evaluate.batch_size,
                                                                        device, flip), device, bf16)
                  for flip in ((False, True) if p.evaluate.flip else (False,))}
    averaged = sum(logits.values()) / len(logits)
    seconds = round(time.perf_counter() - started, 3)
    loss, accuracy = inference.loss_and_accuracy(averaged, torch.from_numpy(labels))
    predicted = averaged.argmax(1).numpy()
    per_class = {c: float((predicted[labels == i] == i).mean()) for i, c in enumerate(classes)}
    cost_parts = [outputs.read_json(outputs.FEATURE_METRICS)["time_s"], trained.time_s(p.strategy), seconds,
                  *([trained.time_s("feature_extraction")] if p.strategy == "lp_ft" else [])]  # its probe
    metrics = {"test": {"accuracy": accuracy, "loss": loss}, "total_time_s": round(sum(cost_parts), 2),
               "evaluate_time_s": seconds,
               "run": {"device": hardware.describe(device), "inference": hardware.precision(device, bf16),
                       "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}
    outputs.write_json(outputs.METRICS, metrics)
    write_plots(labels, predicted, per_class, images, classes, f"{p.model}, {p.strategy}")
    print(f"test accuracy {accuracy:.4f}, loss {loss:.4f} on {len(labels)} images ({p.model}, {p.strategy}"
          f"{', on the cached features' if feature_extraction else ''})")


def cached_logits(head: torch.nn.Module, flip: bool, count: int, device, bf16: bool) -> dict:
    """The head's logits on the cached test features, and on the flipped ones with evaluate.flip. Under
    the whole model's autocast: the body's bf16 output is exact in the cache's fp16, so the two paths agree."""
    width = next(m for m in head.modules() if isinstance(m, torch.nn.Linear)).in_features
    logits = {}
    for mirrored in ((False, True) if flip else (False,)):
        path = outputs.FEATURES / ("test_flip.npy" if mirrored else "test.npy")
        if not path.exists():
            raise UserError(f"{path} is missing (removed since cache-features wrote the cache): "
                            "run dvc repro -f cache-features")
        cached = torch.from_numpy(np.load(path))
        if cached.shape != (count, width):
            raise UserError(f"{path} holds {len(cached)} feature vectors of {cached.shape[1]} values, but there are "
                            f"{count} test images and the head reads {width} values, so it was changed since "
                            "cache-features wrote it: run dvc repro -f cache-features")
        logits[mirrored] = inference.predict(head, inference.feature_inputs(cached, device), device, bf16)
    return logits


def write_plots(labels, predicted, per_class, images, classes, title) -> None:
    folder = outputs.fresh_folder(outputs.PLOTS / "data")
    outputs.write_json(folder / "confusion.json",
                       [{"actual": classes[t], "predicted": classes[g]} for t, g in zip(labels, predicted)])
    outputs.write_json(folder / "per_class_accuracy.json", [{"class": c, "accuracy": a} for c, a in per_class.items()])
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    figures.confusion(matrix, classes, f"Test confusion matrix: {title}", outputs.PLOTS / "confusion.png")
    shown = np.linspace(0, len(labels) - 1, min(GRID_IMAGES, len(labels))).astype(int)
    figures.prediction_grid(images[shown], labels[shown], predicted[shown], classes,
                            f"Test predictions: {title}", outputs.PLOTS / "predictions.png")


if __name__ == "__main__":
    run_stage(main)
