"""The train-heads stage's training (stages/train_heads.py runs it): the head by epochs on the cached
features, or its last Linear as a linear probe (stages/training/probe.py)."""

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.data import arrays, inputs
from stages.model import devices, inference, probe_layers
from stages.pipeline import outputs, params, trained
from stages.training import loop, probe


def train(p: params.Params) -> None:
    """The stage's work, for feature extraction and lp_ft: the head by epochs, or the probe."""
    outputs.fresh_folder(outputs.MODELS["feature_extraction"])
    cfg = p.train_heads
    device = devices.setup(p.device, p.seed)
    names = arrays.load_manifest(outputs.PREPARED)["classes"]
    classes = len(names)
    head = new_head(p, classes).to(device)
    train_labels = arrays.open_split(outputs.PREPARED, "train")[1]
    features = {name: load_features(outputs.FEATURES / f"{name}.npy", device)
                for name in ("train", "train_flip", "val") if (outputs.FEATURES / f"{name}.npy").exists()}
    if p.data.train_per_class is not None:  # else every row, without a copy of the features
        subset = arrays.train_subset(train_labels, p.data.train_per_class, p.seed, names)
        train_labels = train_labels[subset]
        features.update({name: features[name][torch.from_numpy(subset).to(features[name].device)]
                         for name in ("train", "train_flip") if name in features})
    labels = {"train": inputs.to_device(train_labels, device),
              "val": inputs.to_device(arrays.open_split(outputs.PREPARED, "val")[1], device)}
    if cfg.solver == "lbfgs":
        # With a subset, val is only for choosing: training on it would add its images to every size
        fit_probe(head, features, labels, classes, refit_on_val=p.data.train_per_class is None)
        return

    def train_batches(generator):
        return feature_batches(features["train"], features.get("train_flip"), labels["train"], cfg.batch_size,
                               generator)

    def validate():
        batches = inference.feature_inputs(features["val"], device)
        return inference.loss_and_accuracy(inference.predict(head, batches, device), labels["val"])

    trainable = [t for t in head.parameters() if t.requires_grad]
    training = loop.Training(head, [{"params": trainable, "lr": cfg.lr}], train_batches, len(labels["train"]),
                             validate if len(labels["val"]) else None)
    fitted = loop.fit(training, cfg, p.seed, device, outputs.LIVE["feature_extraction"], watched=False)
    trained.save("feature_extraction", fitted.state, epoch=fitted.epoch, saw_val=False)
    print(loop.chosen(fitted))
    outputs.write_json(outputs.L2_SEARCH, [])


def new_head(p: params.Params, classes: int) -> nn.Module:
    head = probe_layers.probe_head(p, classes)
    set_head_trainable(head, p.train_heads.trainable)
    return head


def set_head_trainable(head: nn.Module, trainable: str) -> int:
    """Feature extraction trains the head on cached features: `last`, only its final Linear (the
    study's classifier[6]; FC6 and FC7 keep their ImageNet values), or the whole `classifier`.
    Returns the number of trainable parameters."""
    last = head[-1] if isinstance(head, nn.Sequential) else head
    head.requires_grad_(trainable == "classifier")
    last.requires_grad_(True)
    return loop.trainable_count(head)


def fit_probe(head: nn.Module, features: dict, labels: dict, classes: int, refit_on_val: bool = True) -> None:
    """The head's last Linear as a linear probe on what the rest of the head makes of the features:
    its L2 strength chosen on val, then refitted on train + val (or on train alone)."""
    started = time.perf_counter()
    frozen, last = (head[:-1], head[-1]) if isinstance(head, nn.Sequential) else (nn.Identity(), head)
    flipped = ["train_flip"] if "train_flip" in features else []
    device = labels["train"].device
    train_x = torch.cat([probe_inputs(frozen, features[name], device) for name in ["train", *flipped]])
    train_y = labels["train"].repeat(1 + len(flipped))
    val_x, val_y = probe_inputs(frozen, features["val"], device), labels["val"]
    standardise = probe.Standardiser.of(train_x)
    train_x, val_x = standardise(train_x), standardise(val_x)
    search, chosen = probe.search_l2(train_x, train_y, val_x, val_y, classes)
    l2 = 10.0 ** chosen["log10_l2"]
    if refit_on_val:
        train_x, train_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    weight, bias, evaluations = probe.fit(train_x, train_y, l2, classes)
    weight, bias = standardise.fold(weight, bias)
    with torch.no_grad():
        last.weight.copy_(weight)
        last.bias.copy_(bias)
    trained.save("feature_extraction", head.state_dict(), l2=l2, saw_val=refit_on_val)
    seconds = time.perf_counter() - started
    live = loop.Record(outputs.LIVE["feature_extraction"])
    live.log_plot("l2_search", search, x="log10_l2", y="val_accuracy", template="linear",
                  title="Linear probe: validation accuracy per L2 strength", x_label="log10 of the L2 strength",
                  y_label="validation accuracy")
    live.summary.update(trained.summary(seconds, len(train_y), len(labels["train"]),
                                        last.weight.numel() + last.bias.numel(),
                                        best_val=chosen["val_accuracy"], l2=l2))
    live.end()
    outputs.empty_curves(outputs.LIVE["feature_extraction"])  # no epochs: the per-epoch curves that dvc.yaml declares stay empty
    print(f"linear probe: L2 strength {l2:.3g} (val accuracy {chosen['val_accuracy']:.4f}, {len(search)} fits), "
          f"refitted on train{' + val' if refit_on_val else ''} in {evaluations} evaluations; {seconds:.1f} s")


@torch.no_grad()
def probe_inputs(frozen: nn.Module, features: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 inputs of the last Linear: the frozen rest of the head (FC6, FC7) in eval mode, on the device."""
    frozen.eval()
    return torch.cat([frozen(x) for x, _count in inference.feature_inputs(features, device)])


def load_features(path: Path, device: torch.device) -> torch.Tensor:
    """fp16 features, whole, on the device; in (pinned) host memory when they don't fit there."""
    features = torch.from_numpy(np.load(path))
    if fits_on(device, features.nbytes):
        return features.to(device)
    print(f"{path} does not fit in {device} memory: streaming its batches from host memory")
    return features.pin_memory()


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether `nbytes` more fit in the device's free memory with room to spare (always on the CPU)."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes < 0.5 * free


def feature_batches(features, flipped, labels, batch_size, generator):
    """Shuffled batches; each sample is the flipped image's features with probability 1/2."""
    order = torch.randperm(len(labels), generator=generator, device=labels.device)
    for index in order.split(batch_size):
        rows = index.to(features.device)
        x = features[rows].to(labels.device, non_blocking=True)
        if flipped is not None:
            use_flipped = torch.rand(len(index), generator=generator, device=labels.device) < 0.5
            x = torch.where(use_flipped[:, None], flipped[rows].to(labels.device, non_blocking=True), x)
        yield x.float(), labels[index]

