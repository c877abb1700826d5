"""finetune: the backbone's unfrozen blocks and its classifier, trained on images.

    python -m stages.finetune            # or: dvc repro finetune

finetune.unfreeze: all trains every layer, as the study's notebook did; N trains the last N
blocks. The unfrozen blocks learn at finetune.backbone_lr, the classifier at finetune.lr.
Images are flipped and cropped on the device at their stored size (if asked), then resized.
A checkpoint after every epoch, in .checkpoints/finetune/<fingerprint>/ (outside DVC's
outputs, so that the stage stays in the run-cache), lets an interrupted run resume: rerun the
stage and it goes on from the last complete epoch; it is deleted when the stage completes.
Writes models/finetune/model.pt and DVCLive's record to live/finetune/.
"""
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from stages import augment, backbones, data, device as devices, inputs, loop, outputs, params
from stages.errors import run_stage

PREPARED = Path("data/prepared")
OUT = Path("models/finetune")
LIVE = Path("live/finetune")
CHECKPOINTS = Path(".checkpoints/finetune")


def main():
    p = params.load()
    if not outputs.chosen_strategy(OUT, p.strategy, "finetune"):
        outputs.empty_live(LIVE)
        return
    device = devices.setup(p.device, p.seed)
    cfg = p.finetune
    network = backbones.build(p.model, p.weights, data.num_classes(PREPARED), p.data.image_size)
    backbones.set_trainable(network, cfg.unfreeze)
    model = devices.place(network.model, device)
    body_params = [t for t in network.body.parameters() if t.requires_grad]
    groups = [{"params": list(network.head.parameters()), "lr": cfg.lr}]
    if body_params:
        groups.append({"params": body_params, "lr": cfg.backbone_lr})
    train_images, train_labels = (inputs.to_device(a, device) for a in data.load_split(PREPARED, "train"))
    val_images, val_labels = (inputs.to_device(a, device) for a in data.load_split(PREPARED, "val"))
    fast_model = devices.maybe_compile(model, p.compile)

    def train_batches(generator):
        order = torch.randperm(len(train_labels), generator=generator, device=device)
        for index in order.split(cfg.batch_size):
            x = augment.augment(train_images[index], cfg.flip, cfg.crop_padding, generator)
            yield inputs.model_input(x, network.preprocess, p.data.image_size, p.data.crop_pct), train_labels[index]

    def validate():
        batches = inputs.image_inputs(val_images, network.preprocess, p.data.image_size, p.data.crop_pct,
                                      p.evaluate.batch_size, device)
        return loop.loss_and_accuracy(loop.predict(fast_model, batches, device), val_labels)

    key = fingerprint(p)
    checkpoint = CHECKPOINTS / key[:16] / "last.pt"
    fitted = loop.fit(fast_model, groups, train_batches, len(train_labels), validate if len(val_labels) else None,
                      cfg, p.seed, device, LIVE, checkpoint, key, state_of=model)
    loop.save_trained(OUT / "model.pt", fitted, "model")
    shutil.rmtree(checkpoint.parent)


def fingerprint(p: params.Params) -> str:
    """What a checkpoint must have been written for, to be resumed: the params and the data."""
    relevant = {"seed": p.seed, "model": p.model, "weights": p.weights, "device": p.device, "compile": p.compile,
                "image_size": p.data.image_size, "crop_pct": p.data.crop_pct, "finetune": asdict(p.finetune),
                "evaluate": asdict(p.evaluate), "data": (PREPARED / "manifest.json").read_text(),
                "labels": hashlib.sha256((PREPARED / "train_labels.npy").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    run_stage(main)
