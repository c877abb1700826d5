"""finetune: the last blocks of the backbone and its classifier, trained on images.

    python -m stages.finetune            # or: dvc repro finetune

The unfrozen blocks learn at finetune.backbone_lr, the head at finetune.lr. Images are
flipped and cropped on the device at their stored size, then upsampled. A checkpoint after
every epoch (checkpoints/finetune/, a persisted DVC output) lets an interrupted run resume:
rerun the stage and it goes on from the last complete epoch. Writes models/finetune/model.pt.
"""
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from stages import backbones, batches, data, loop, params

PREPARED = Path("data/prepared")
OUT = Path("models/finetune")
CHECKPOINT = Path("checkpoints/finetune/last.pt")


def main():
    p = params.load()
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)  # a DVC output in both strategies
    if not params.start_strategy_stage(OUT, p, "finetune"):
        return
    device = batches.setup(p.device, p.seed)
    cfg = p.finetune
    network = backbones.build(p.model, p.weights, data.num_classes(PREPARED))
    trainable = backbones.set_trainable(network, cfg.unfreeze)
    model = batches.place(network.model, device)
    body_params = [t for t in network.body.parameters() if t.requires_grad]
    groups = [{"params": network.head.parameters(), "lr": cfg.lr}]
    if body_params:
        groups.append({"params": body_params, "lr": cfg.backbone_lr})
    train_images, train_labels = (batches.to_device(a, device) for a in data.load_split(PREPARED, "train"))
    val_images, val_labels = (batches.to_device(a, device) for a in data.load_split(PREPARED, "val"))

    def train_batches(generator):
        order = torch.randperm(len(train_labels), generator=generator, device=device)
        for index in order.split(cfg.batch_size):
            x = batches.augment(train_images[index], cfg.flip, cfg.crop_padding, generator)
            yield batches.model_input(x, network.preprocess, p.data.image_size), train_labels[index]

    def validate():
        inputs = batches.image_inputs(val_images, network.preprocess, p.data.image_size, p.evaluate.batch_size, device)
        return loop.loss_and_accuracy(loop.predict(model, inputs, device), val_labels)

    fitted = loop.fit(model, groups, train_batches, len(train_labels), validate, cfg, p.seed, device,
                      OUT / "live", CHECKPOINT, fingerprint(p))
    loop.save_trained(OUT / "model.pt", fitted, "model", trainable)


def fingerprint(p: params.Params) -> str:
    """What a checkpoint must have been written for, to be resumed: the params and the data."""
    relevant = {"seed": p.seed, "model": p.model, "weights": p.weights, "device": p.device,
                "image_size": p.data.image_size, "finetune": asdict(p.finetune),
                "data": (PREPARED / "manifest.json").read_text(),
                "labels": hashlib.sha256((PREPARED / "train_labels.npy").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    params.run_stage(main)
