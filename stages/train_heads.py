"""train-heads: the classifier trained on the cached features (feature extraction).

    python -m stages.train_heads         # or: dvc repro train-heads

The head is the backbone's own classifier with a new last Linear. train_heads.trainable: last
trains only that Linear, as the study's notebook did: FC6 and FC7 of AlexNet and VGG16 keep
their ImageNet values, and their Dropout stays active in training. `classifier` trains all of
it. Flipped-image features (features.flip) stand in for augmentation. Writes
models/train_heads/model.pt (the best epoch by val accuracy, or the last one without a
validation split) and DVCLive's record to live/train_heads/.
"""
from pathlib import Path

import numpy as np
import torch

from stages import backbones, data, device as devices, inputs, loop, outputs, params
from stages.errors import run_stage

PREPARED = Path("data/prepared")
FEATURES = Path("data/features")
OUT = Path("models/train_heads")
LIVE = Path("live/train_heads")


def main():
    p = params.load()
    if not outputs.chosen_strategy(OUT, p.strategy, "feature_extraction"):
        outputs.empty_live(LIVE)
        return
    cfg = p.train_heads
    device = devices.setup(p.device, p.seed)
    network = backbones.build(p.model, p.weights, data.num_classes(PREPARED))
    backbones.set_head_trainable(network, cfg.trainable)
    head = network.head.to(device)
    features = {name: load_features(FEATURES / f"{name}.npy", device)
                for name in ("train", "train_flip", "val") if (FEATURES / f"{name}.npy").exists()}
    labels = {name: inputs.to_device(data.load_split(PREPARED, name)[1], device) for name in ("train", "val")}

    def train_batches(generator):
        return feature_batches(features["train"], features.get("train_flip"), labels["train"], cfg.batch_size,
                               generator)

    def validate():
        batches = ((x.to(device).float(), len(x)) for x in features["val"].split(4096))
        return loop.loss_and_accuracy(loop.predict(head, batches, device), labels["val"])

    trainable = [t for t in head.parameters() if t.requires_grad]
    fitted = loop.fit(head, [{"params": trainable, "lr": cfg.lr}], train_batches, len(labels["train"]),
                      validate if len(labels["val"]) else None, cfg, p.seed, device, LIVE)
    loop.save_trained(OUT / "model.pt", fitted, "head")


def load_features(path: Path, device: torch.device) -> torch.Tensor:
    """fp16 features, whole, on the device; in (pinned) host memory when they don't fit there."""
    features = torch.from_numpy(np.load(path))
    if inputs.fits_on(device, features.nbytes):
        return features.to(device)
    print(f"{path} does not fit in {device} memory: streaming its batches from host memory")
    return features.pin_memory()


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


if __name__ == "__main__":
    run_stage(main)
