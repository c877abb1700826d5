"""train-heads: the classifier trained on the cached features (feature extraction).

    python -m stages.train_heads         # or: dvc repro train-heads

The head starts from the backbone's own classifier (FC6 and FC7 keep their ImageNet values
for AlexNet and VGG16, as in the study). Flipped-image features stand in for augmentation.
Writes models/train_heads/model.pt (the best epoch by val accuracy) and DVCLive logs beside it.
"""
from pathlib import Path

import numpy as np
import torch

from stages import backbones, batches, data, loop, params

PREPARED = Path("data/prepared")
FEATURES = Path("data/features")
OUT = Path("models/train_heads")


def main():
    p = params.load()
    if not params.start_strategy_stage(OUT, p, "feature_extraction"):
        return
    device = batches.setup(p.device, p.seed)
    head = backbones.build(p.model, p.weights, data.num_classes(PREPARED)).head.to(device)
    features = {name: load_features(FEATURES / f"{name}.npy", device)
                for name in ("train", "train_flip", "val") if (FEATURES / f"{name}.npy").exists()}
    labels = {name: batches.to_device(data.load_split(PREPARED, name)[1], device) for name in ("train", "val")}

    def train_batches(generator):
        return feature_batches(features["train"], features.get("train_flip"), labels["train"],
                               p.train_heads.batch_size, generator)

    def validate():
        logits = loop.predict(head, (x.float() for x in features["val"].split(4096)), device)
        return loop.loss_and_accuracy(logits, labels["val"])

    fitted = loop.fit(head, [{"params": head.parameters(), "lr": p.train_heads.lr}], train_batches,
                      len(labels["train"]), validate, p.train_heads, p.seed, device, OUT / "live")
    loop.save_trained(OUT / "model.pt", fitted, "head", sum(t.numel() for t in head.parameters()))


def load_features(path: Path, device: torch.device) -> torch.Tensor:
    """fp16 features, whole, on the device; batches turn them to float32 as they go."""
    return torch.from_numpy(np.load(path)).to(device)


def feature_batches(features, flipped, labels, batch_size, generator):
    """Shuffled batches; each sample is the flipped image's features with probability 1/2."""
    order = torch.randperm(len(labels), generator=generator, device=labels.device)
    for index in order.split(batch_size):
        x = features[index]
        if flipped is not None:
            use_flipped = torch.rand(len(index), generator=generator, device=labels.device) < 0.5
            x = torch.where(use_flipped[:, None], flipped[index], x)
        yield x.float(), labels[index]


if __name__ == "__main__":
    params.run_stage(main)
