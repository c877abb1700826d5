"""evaluate: the trained model's test accuracy, loss and figures; the cell's whole cost.

    python -m stages.evaluate            # or: dvc repro evaluate

Both strategies are measured on the same test images with the same preprocessing. Fine-tuning
runs its whole model on them. Feature extraction's body is frozen, so cache-features already ran
it over the test images (and their mirror images, with evaluate.flip): the head runs on those
cached features, and the whole model runs on a fixed sample of CHECK_IMAGES test images, whose
predictions must agree with the cached path's, or the cache is stale. evaluate.flip averages each
image's logits with its mirror image's. Writes metrics/metrics.json (test accuracy and loss, and
the whole cell's cost: the feature cache's time, training's and evaluation's, each recorded by
its own stage), plots/data/ for `dvc plots` (per-class accuracy too), and PNGs.
"""

import os
import time

import numpy as np
import torch

from stages.data import arrays, inputs
from stages.model import backbones, devices, hardware, inference, probe_layers
from stages.pipeline import figures, outputs, params, trained
from stages.pipeline.errors import UserError, run_stage

GRID_IMAGES = 32  # test images in the predictions figure
CHECK_IMAGES = 256  # test images that the whole model runs on to check the cached features: a stale cache agrees on few
MIN_AGREEMENT = 0.95  # a stale cache agrees far less; bf16 flips a few near-ties


def main():
    p = params.load()
    feature_extraction = p.strategy == "feature_extraction"
    outputs.require(outputs.PREPARED / "manifest.json", outputs.TRAINED[p.strategy], trained.summary_file(p.strategy),
                    outputs.FEATURE_METRICS, *([outputs.FEATURES / "manifest.json"] if feature_extraction else []),
                    *([trained.summary_file("feature_extraction")] if p.strategy == "lp_ft" else []))
    device = devices.setup(p.device)
    bf16 = hardware.bf16_on_cpu(p.cpu_bf16)
    classes = arrays.load_manifest(outputs.PREPARED)["classes"]
    images, labels = arrays.open_split(outputs.PREPARED, "test")
    probe_layer = p.train_heads.probe_layer if feature_extraction else "penultimate"
    network = probe_layers.reading(backbones.build(p.model, p.model_weights, len(classes), p.data.image_size),
                                   probe_layer, len(classes))
    trained.load_into(network, p.strategy)
    model = devices.maybe_compile(devices.place(network.model, device), p.compile)
    preprocess = network.preprocess.at(p.data.image_size, p.data.crop_pct)

    def on_images(chosen: np.ndarray | None = None) -> dict:
        """The whole model's logits for the test images (those at `chosen`), per flip that evaluate.flip asks for."""
        shown = images if chosen is None else images[chosen]
        return {flip: inference.predict(model, inputs.image_inputs(shown, preprocess, p.evaluate.batch_size, device,
                                                                   flip), device, bf16)
                for flip in ((False, True) if p.evaluate.flip else (False,))}

    started = time.perf_counter()
    if feature_extraction:
        logits = cached_logits(network.head, p.evaluate.flip, len(labels), device, bf16)
        sample = check_sample(len(labels))
        cache_check = compare_with_cache({flip: part[sample] for flip, part in logits.items()}, on_images(sample))
    else:
        logits = on_images()
    averaged = sum(logits.values()) / len(logits)
    seconds = round(time.perf_counter() - started, 2)
    loss, accuracy = inference.loss_and_accuracy(averaged, torch.from_numpy(labels))
    predicted = averaged.argmax(1).numpy()
    per_class = {c: float((predicted[labels == i] == i).mean()) for i, c in enumerate(classes)}
    cost_parts = [outputs.read_json(outputs.FEATURE_METRICS)["time_s"], trained.time_s(p.strategy), seconds,
                  *([trained.time_s("feature_extraction")] if p.strategy == "lp_ft" else [])]  # its probe
    metrics = {"test": {"accuracy": accuracy, "loss": loss}, "total_time_s": round(sum(cost_parts), 2),
               "evaluate_time_s": seconds,
               "run": {"device": hardware.describe(device), "inference": hardware.precision(device, bf16),
                       "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}
    if feature_extraction:
        metrics["cache_check"] = cache_check
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
            raise UserError(f"{path} is missing, so the feature cache predates "
                            f"{'evaluate.flip: true' if mirrored else 'this pipeline'}: run dvc repro -f cache-features")
        cached = torch.from_numpy(np.load(path))
        if cached.shape != (count, width):
            raise UserError(f"{path} holds {len(cached)} feature vectors of {cached.shape[1]} values, but there are "
                            f"{count} test images and the head reads {width} values, so the cache comes from another "
                            "backbone or other images: run dvc repro -f cache-features")
        logits[mirrored] = inference.predict(head, inference.feature_inputs(cached, device), device, bf16)
    return logits


def check_sample(count: int) -> np.ndarray:
    """The test images that the whole model runs on: CHECK_IMAGES of them, evenly spread, the same every run."""
    return np.linspace(0, count - 1, min(CHECK_IMAGES, count)).astype(np.int64)


def compare_with_cache(from_cache: dict, from_images: dict) -> dict:
    """The cached path's logits against the whole model's on the same images, per flip: the two
    must agree, or the cached features do not come from this backbone and these images."""
    agreement = min((from_cache[f].argmax(1) == from_images[f].argmax(1)).float().mean().item() for f in from_images)
    if agreement < MIN_AGREEMENT:
        raise UserError(f"the head on the cached features agrees with the full model on only {agreement:.1%} of "
                        f"{len(from_images[False])} test images, so the cache does not come from this backbone "
                        "and these images: run dvc repro -f cache-features")
    return {"images": len(from_images[False]), "prediction_agreement": agreement,
            "max_logit_diff": max((from_cache[f] - from_images[f]).abs().max().item() for f in from_images)}


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
