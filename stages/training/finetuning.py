"""The fine-tuning stage's training (stages/finetune.py runs it), on one process or as one of
torchrun's workers (stages/training/distributed.py)."""

import hashlib
import json
import shutil
from dataclasses import asdict

import torch

from stages.data import arrays, augment, inputs
from stages.model import backbones, devices, inference
from stages.pipeline import outputs, params, trained
from stages.training import distributed, loop
from stages.training.checkpoints import Checkpoints
from stages.pipeline.errors import UserError
from stages.finetune import CHECKPOINTS, LIVE, OUT


def train(p: params.Params, joining: bool) -> None:
    """The stage's work, with strategy finetune."""
    cfg = p.finetune
    key = fingerprint(p)
    worker = distributed.start(cfg, p.device, p.seed, first_node=not joining, fingerprint=key)
    if worker is None:  # this process launched torchrun's workers, which did the work
        return
    device, rank, world = worker.device, worker.rank, worker.world
    if distributed.is_writer():
        outputs.fresh_folder(OUT)
    network = backbones.build(p.model, p.weights, arrays.num_classes(outputs.PREPARED), p.data.image_size)
    set_trainable(network, cfg.unfreeze)
    model = devices.place(network.model, device)
    train_images, train_labels = (inputs.to_device(a, device) for a in arrays.open_train_subset(
        outputs.PREPARED, p.data.train_per_class, p.seed))
    val_images, val_labels = (inputs.to_device(a, device) for a in arrays.open_split(outputs.PREPARED, "val"))
    if cfg.drop_last and len(train_labels) < cfg.batch_size:
        raise UserError(f"params.yaml: finetune.drop_last leaves no batch of {cfg.batch_size} from "
                        f"{len(train_labels)} training images: set finetune.drop_last: false or a smaller batch_size")
    params.check_crop_padding(cfg.crop_padding, train_images.shape[1])
    fast_model = devices.maybe_compile(worker.wrap(model), p.compile)

    def validate():
        """Each process predicts its share of the val images; the sums are added up across them."""
        mine = torch.arange(rank, len(val_labels), world, device=device)
        batches = inputs.image_inputs(val_images[mine], network.preprocess, p.data.image_size, p.data.crop_pct,
                                      p.evaluate.batch_size, device)
        logits = inference.predict(fast_model, batches, device)
        labels = val_labels[mine].cpu()
        loss_sum, correct, count = loop.summed_across_processes(
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
            (logits.argmax(1) == labels).sum(), len(labels))
        return loss_sum / count, correct / count

    checkpoints = Checkpoints(CHECKPOINTS / key[:16] / "last.pt", key, device, cfg.checkpoint_interval_s) \
        if cfg.nodes == 1 else None  # a joining node has none: a run on several nodes starts over
    training = loop.Training(fast_model, parameter_groups(network, cfg), lambda generator: train_batches(
                                 train_images, train_labels, cfg, p.data, network.preprocess, generator, rank, world),
                             len(train_labels), validate if len(val_labels) else None, state_of=model)
    with distributed.peers(cfg):
        fitted = loop.fit(training, cfg, p.seed, device, LIVE, checkpoints)
        if distributed.is_writer():
            trained.save("finetune", fitted.state, epoch=fitted.epoch)
            print(loop.chosen(fitted))
            if checkpoints:
                shutil.rmtree(checkpoints.path.parent, ignore_errors=True)  # none was written if it ran one epoch


def set_trainable(network: backbones.Network, unfreeze: int | str) -> int:
    """Freezes the body but for its last `unfreeze` blocks (and what follows them); returns the
    number of trainable parameters. The head is always trained."""
    tensors = list(network.body.parameters())
    if unfreeze == "all":
        first = 0
    elif unfreeze == 0:
        first = len(tensors)
    elif unfreeze > len(network.blocks):
        raise UserError(f"finetune.unfreeze is {unfreeze}, but this model has {len(network.blocks)} blocks "
                        "that can be unfrozen: lower it, or use all")
    else:
        first_tensor = next(network.blocks[-unfreeze].parameters())
        first = next(i for i, t in enumerate(tensors) if t is first_tensor)
    for i, t in enumerate(tensors):
        t.requires_grad_(i >= first)
    network.head.requires_grad_(True)
    return sum(t.numel() for t in network.model.parameters() if t.requires_grad)


def parameter_groups(network: backbones.Network, cfg: params.FinetuneParams) -> list[dict]:
    """The classifier at finetune.lr; the unfrozen blocks of the body, if any, at finetune.backbone_lr."""
    groups = [{"params": list(network.head.parameters()), "lr": cfg.lr}]
    body = [t for t in network.body.parameters() if t.requires_grad]
    return groups + ([{"params": body, "lr": cfg.backbone_lr}] if body else [])


def train_batches(images, labels, cfg: params.FinetuneParams, data_params: params.DataParams,
                  preprocess: inputs.Preprocess, generator: torch.Generator, rank: int = 0, world: int = 1):
    """One epoch's (inputs, labels), shuffled and augmented on the device. Every process draws
    the same global batches, flips and crops from the same generator; each keeps its share."""
    order = torch.randperm(len(labels), generator=generator, device=labels.device)
    for index in order.split(cfg.batch_size):
        if len(index) < (cfg.batch_size if cfg.drop_last else world):
            continue  # a partial last batch when dropped, or one too small to give every process a row
        x = augment.augment(images[index], cfg.flip, cfg.crop_padding, generator)
        mine = torch.tensor_split(torch.arange(len(index), device=labels.device), world)[rank]
        yield inputs.model_input(x[mine], preprocess, data_params.image_size, data_params.crop_pct), labels[index[mine]]


def fingerprint(p: params.Params) -> str:
    """What a checkpoint must have been written for, to be resumed, and what every node must share:
    the params and the data."""
    relevant = {"seed": p.seed, "model": p.model, "weights": p.weights, "device": p.device, "compile": p.compile,
                "image_size": p.data.image_size, "crop_pct": p.data.crop_pct, "finetune": asdict(p.finetune),
                "train_per_class": p.data.train_per_class,
                "evaluate_batch_size": p.evaluate.batch_size, "data": (outputs.PREPARED / "manifest.json").read_text(),
                "labels": hashlib.sha256((outputs.PREPARED / "train_labels.npy").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()
