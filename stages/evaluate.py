"""evaluate: the full model (backbone plus trained head) on the test images.

    python -m stages.evaluate            # or: dvc repro evaluate

Always runs on images, never on cached features, so both strategies are measured the same
way. For feature extraction it also runs the head on the cached test features and records how
far the two paths' logits differ. Writes metrics/metrics.json and plots/ for `dvc plots`.
"""
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages import backbones, batches, data, figures, loop, params

PREPARED = Path("data/prepared")
FEATURES = Path("data/features")
MODELS = {"feature_extraction": Path("models/train_heads/model.pt"), "finetune": Path("models/finetune/model.pt")}
METRICS = Path("metrics/metrics.json")
PLOTS = Path("plots")
GRID_IMAGES = 32  # test images in the predictions figure
MIN_AGREEMENT = 0.95  # a stale cache agrees far less; bf16 on the GPU flips a few near-ties


def main():
    p = params.load()
    device = batches.setup(p.device, p.seed)
    classes = data.load_manifest(PREPARED)["classes"]
    images, labels = data.load_split(PREPARED, "test")
    trained = torch.load(MODELS[p.strategy], map_location="cpu", weights_only=False)
    network = backbones.build(p.model, p.weights, len(classes))
    if p.strategy == "feature_extraction":
        network.head.load_state_dict(trained["head"])
    else:
        network.model.load_state_dict(trained["model"])
    model = batches.place(network.model, device)

    started = time.perf_counter()
    inputs = batches.image_inputs(torch.from_numpy(images), network.preprocess, p.data.image_size,
                                  p.evaluate.batch_size, device)
    logits = loop.predict(model, inputs, device)
    seconds = time.perf_counter() - started
    loss, accuracy = loop.loss_and_accuracy(logits, torch.from_numpy(labels))
    predicted = logits.argmax(1).numpy()
    per_class = {c: float((predicted[labels == i] == i).mean()) for i, c in enumerate(classes)}
    metrics = {
        "test": {"accuracy": accuracy, "loss": loss, "images_per_s": round(len(labels) / seconds, 1),
                 "per_class_accuracy": per_class},
        "train": {"time_s": round(trained["train_time_s"], 2),
                  "images_per_s": round(trained["train_images_per_s"], 1),
                  "trainable_params": trained["trainable_params"],
                  "best_epoch": trained["best_epoch"], "epochs_run": len(trained["history"])},
        "run": {"device": describe(device)},
    }
    if p.strategy == "feature_extraction":
        metrics["cache_check"] = compare_with_cache(network.head, logits, device)
    METRICS.parent.mkdir(parents=True, exist_ok=True)
    METRICS.write_text(json.dumps(metrics, indent=2) + "\n")
    write_plots(trained["history"], labels, predicted, per_class, images, classes, f"{p.model}, {p.strategy}")
    print(f"test accuracy {accuracy:.4f}, loss {loss:.4f} on {len(labels)} images ({p.model}, {p.strategy})")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def compare_with_cache(head: torch.nn.Module, logits: torch.Tensor, device) -> dict:
    """Runs the head on the cached test features: the two paths must agree, or the cache is stale."""
    cached = torch.from_numpy(np.load(FEATURES / "test.npy"))
    from_cache = loop.predict(head, (x.to(device).float() for x in cached.split(4096)), device)
    agreement = (from_cache.argmax(1) == logits.argmax(1)).float().mean().item()
    if agreement < MIN_AGREEMENT:
        raise params.UserError(f"the head agrees with the full model on only {agreement:.1%} of test images, "
                               "so the cached features do not come from this backbone (were the weights "
                               "replaced in place?): run dvc repro -f cache-features")
    return {"max_logit_diff": (from_cache - logits).abs().max().item(), "prediction_agreement": agreement}


def write_plots(history, labels, predicted, per_class, images, classes, title) -> None:
    (PLOTS / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(history).drop(columns="seconds").to_csv(PLOTS / "data/learning_curve.csv", index=False)
    pairs = [{"actual": classes[t], "predicted": classes[g]} for t, g in zip(labels, predicted)]
    (PLOTS / "data/confusion.json").write_text(json.dumps(pairs) + "\n")
    rows = [{"class": c, "accuracy": a} for c, a in per_class.items()]
    (PLOTS / "data/per_class_accuracy.json").write_text(json.dumps(rows, indent=1) + "\n")
    figures.learning_curves(history, f"Learning curves: {title}", PLOTS / "learning_curves.png")
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    figures.confusion(matrix, classes, f"Test confusion matrix: {title}", PLOTS / "confusion.png")
    shown = np.linspace(0, len(labels) - 1, min(GRID_IMAGES, len(labels))).astype(int)
    figures.prediction_grid(images[shown], labels[shown], predicted[shown], classes,
                            f"Test predictions: {title}", PLOTS / "predictions.png")


if __name__ == "__main__":
    params.run_stage(main)
