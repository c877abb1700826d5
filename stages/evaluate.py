"""evaluate: the full model (backbone plus trained head) on the test images.

    python -m stages.evaluate            # or: dvc repro evaluate

Always runs on images, never on cached features, so both strategies are measured the same
way. evaluate.flip averages each image's logits with its mirror image's. For feature extraction
it also runs the head on the cached test features and records how far the two paths' logits
differ (the unflipped images'; the cache holds no flipped test features). Writes
metrics/metrics.json (test accuracy and loss, and the whole cell's cost: the feature cache's
time plus training's, each recorded by its own stage), plots/data/ for `dvc plots` (per-class
accuracy too), and PNGs.
"""

import os

import numpy as np
import torch

from stages.data import arrays, inputs
from stages.model import backbones, devices, inference
from stages.pipeline import figures, outputs, params, trained
from stages.pipeline.errors import UserError, run_stage

GRID_IMAGES = 32  # test images in the predictions figure
MIN_AGREEMENT = 0.95  # a stale cache agrees far less; bf16 on the GPU flips a few near-ties


def main():
    p = params.load()
    outputs.require(outputs.PREPARED / "manifest.json", outputs.TRAINED[p.strategy], trained.summary_file(p.strategy),
                    outputs.FEATURE_METRICS,
                    *([outputs.FEATURES / "manifest.json"] if p.strategy == "feature_extraction" else []))
    device = devices.setup(p.device)
    classes = arrays.load_manifest(outputs.PREPARED)["classes"]
    images, labels = arrays.open_split(outputs.PREPARED, "test")
    probe_layer = p.train_heads.probe_layer if p.strategy == "feature_extraction" else "penultimate"
    network = backbones.build(p.model, p.model_weights, len(classes), p.data.image_size, probe_layer)
    trained.load_into(network, p.strategy)
    model = devices.maybe_compile(devices.place(network.model, device), p.compile)

    preprocess = network.preprocess.at(p.data.image_size, p.data.crop_pct)
    logits = {flip: inference.predict(model, inputs.image_inputs(images, preprocess, p.evaluate.batch_size, device, flip),
                                      device)
              for flip in ((False, True) if p.evaluate.flip else (False,))}
    averaged = sum(logits.values()) / len(logits)
    loss, accuracy = inference.loss_and_accuracy(averaged, torch.from_numpy(labels))
    predicted = averaged.argmax(1).numpy()
    per_class = {c: float((predicted[labels == i] == i).mean()) for i, c in enumerate(classes)}
    cost_parts = [outputs.read_json(outputs.FEATURE_METRICS)["time_s"], trained.time_s(p.strategy),
                  *([trained.time_s("feature_extraction")] if p.strategy == "lp_ft" else [])]  # its probe
    metrics = {"test": {"accuracy": accuracy, "loss": loss}, "total_time_s": round(sum(cost_parts), 2),
               "run": {"device": devices.describe(device), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}
    if p.strategy == "feature_extraction":
        metrics["cache_check"] = compare_with_cache(network.head, logits[False], device)
    outputs.write_json(outputs.METRICS, metrics)
    write_plots(labels, predicted, per_class, images, classes, f"{p.model}, {p.strategy}")
    print(f"test accuracy {accuracy:.4f}, loss {loss:.4f} on {len(labels)} images ({p.model}, {p.strategy})")


def compare_with_cache(head: torch.nn.Module, logits: torch.Tensor, device) -> dict:
    """Runs the head on the cached test features: the two paths must agree, or the cache is stale."""
    cached = torch.from_numpy(np.load(outputs.FEATURES / "test.npy"))
    from_cache = inference.predict(head, inference.feature_inputs(cached, device), device)
    agreement = (from_cache.argmax(1) == logits.argmax(1)).float().mean().item()
    if agreement < MIN_AGREEMENT:
        raise UserError(f"the head agrees with the full model on only {agreement:.1%} of test images, "
                        "so the cached features do not come from this backbone: run dvc repro -f cache-features")
    return {"max_logit_diff": (from_cache - logits).abs().max().item(), "prediction_agreement": agreement}


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
