"""The fine-tuning stage's training (stages/finetune.py runs it), alone or as one of torchrun's
workers (stages/training/distributed.py): every worker holds all the uint8 images on its device,
draws the same seeded global batches and trains on its share of each, so that the global batch
stays finetune.batch_size."""
import dataclasses

import torch

from stages.data import arrays, augment, inputs
from stages.model import backbones, devices, inference
from stages.pipeline import outputs, params, trained
from stages.pipeline.errors import UserError
from stages.pipeline.identity import stage_identity
from stages.training import checkpoints, distributed, loop


def train(p: params.Params) -> None:
    """The stage's work, with strategy finetune, or lp_ft: from the probe that train-heads fitted."""
    cfg = p.finetune
    identity = stage_identity("finetune", p.model_weights)  # before any output is touched
    worker = distributed.start(p.device, p.seed)
    device, rank, world = worker.device, worker.rank, worker.world
    if loop.is_writer():
        outputs.fresh_folder(outputs.MODELS["finetune"])
    network = backbones.build(p.model, p.model_weights, arrays.num_classes(outputs.PREPARED))
    probe = trained.load_into(network.head, "feature_extraction") if p.strategy == "lp_ft" else None
    set_trainable(network, cfg.unfreeze)
    preprocess = network.preprocess.at(p.data.image_size, p.data.crop_pct)
    model = devices.place(network.model, device)
    train_images, train_labels = (inputs.to_device(a, device) for a in arrays.open_train_subset(
        outputs.PREPARED, p.data.train_per_class, p.seed))
    val_images, val_labels = (inputs.to_device(a, device) for a in arrays.open_split(outputs.PREPARED, "val"))
    if len(train_labels) < world:
        raise UserError(f"finetune.processes is {world}, more than the {len(train_labels)} training images: "
                        "lower finetune.processes")
    if len(train_labels) < cfg.batch_size:  # one batch of all of them, so that every size gets its steps
        print(f"batch of {len(train_labels)}: finetune.batch_size {cfg.batch_size} is more than the training images")
        cfg = dataclasses.replace(cfg, batch_size=len(train_labels))
    params.check_crop_padding(cfg.crop_padding, train_images.shape[1])
    fast_model = devices.maybe_compile(worker.wrap(model), p.compile)

    def validate():
        """Each worker predicts its share of the val images; the sums are added up across them."""
        mine = torch.arange(rank, len(val_labels), world, device=device)
        logits = inference.predict(fast_model, inputs.image_inputs(val_images[mine], preprocess, cfg.batch_size,
                                                                   device), device)
        labels = val_labels[mine].cpu()
        loss_sum, correct, count = loop.summed_across_processes(
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
            (logits.argmax(1) == labels).sum(), len(labels))
        return loss_sum / count, correct / count

    saved = checkpoints.Checkpoints(outputs.CHECKPOINTS, identity, cfg.checkpoint_interval_s)
    training = loop.Training(fast_model, parameter_groups(network, cfg), lambda generator: train_batches(
                                 train_images, train_labels, cfg, preprocess, generator, rank, world),
                             len(train_labels), validate if len(val_labels) else None, state_of=model,
                             # the probe's val accuracy is fair unless it was trained on val too
                             start_is_a_candidate=probe is not None and not probe.get("saw_val", True),
                             norms_in_eval=cfg.freeze_norm_stats)
    fitted = loop.fit(training, cfg, p.seed, device, outputs.LIVE["finetune"], saved)
    if loop.is_writer():
        trained.save("finetune", fitted.state, epoch=fitted.epoch)
        print(loop.chosen(fitted))
        saved.remove()
    distributed.finish()


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
    return loop.trainable_count(network.model)


def parameter_groups(network: backbones.Network, cfg: params.FinetuneParams) -> list[dict]:
    """The classifier at finetune.lr; the unfrozen blocks of the body, if any, at finetune.backbone_lr."""
    groups = [{"params": list(network.head.parameters()), "lr": cfg.lr}]
    body = [t for t in network.body.parameters() if t.requires_grad]
    return groups + ([{"params": body, "lr": cfg.backbone_lr}] if body else [])


def train_batches(images, labels, cfg: params.FinetuneParams, preprocess: inputs.Preprocess,
                  generator: torch.Generator, rank: int = 0, world: int = 1):
    """One pass's (inputs, labels), shuffled and augmented on the device. Every worker draws the
    same global batches, flips and crops from the same generator; each keeps its share."""
    order = torch.randperm(len(labels), generator=generator, device=labels.device)
    for index in order.split(cfg.batch_size):
        if len(index) < (cfg.batch_size if cfg.drop_last else world):
            continue  # a partial last batch when dropped, or one too small to give every worker a row
        x = augment.augment(images[index], cfg.flip, cfg.crop_padding, generator)
        mine = torch.tensor_split(torch.arange(len(index), device=labels.device), world)[rank]
        yield inputs.model_input(x[mine], preprocess), labels[index[mine]]
