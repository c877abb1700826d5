"""The fine-tuning stage's training (stages/finetune.py runs it): on one process, or relaunched under torchrun."""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from stages import augment, backbones, data, device as devices, errors, inputs, loop, outputs, params
from stages.checkpoints import Checkpoints
from stages.errors import UserError
from stages.finetune import CHECKPOINTS, LIVE, OUT


def train(p: params.Params, joining: bool) -> None:
    """The stage's work, with strategy finetune: relaunched under torchrun if asked, else trained here."""
    cfg = p.finetune
    if (cfg.processes > 1 or cfg.nodes > 1) and not devices.under_torchrun():
        return run_under_torchrun(cfg, first_node=not joining)
    device = devices.setup_processes(p.device, p.seed, cfg.join_timeout_s)
    rank, world = devices.rank_and_world()
    key = fingerprint(p)
    if cfg.nodes > 1:  # before any other collective: one that differs in shape across nodes would hang
        same_inputs_on_every_node(key, world)
    if devices.is_main_process():
        outputs.fresh_folder(OUT)
    network = backbones.build(p.model, p.weights, data.num_classes(outputs.PREPARED), p.data.image_size)
    backbones.set_trainable(network, cfg.unfreeze)
    model = devices.place(network.model, device)
    groups = parameter_groups(network, cfg)
    train_images, train_labels = (inputs.to_device(a, device) for a in data.open_train_subset(
        outputs.PREPARED, p.data.train_per_class, p.seed))
    val_images, val_labels = (inputs.to_device(a, device) for a in data.open_split(outputs.PREPARED, "val"))
    if cfg.drop_last and len(train_labels) < cfg.batch_size:
        raise UserError(f"params.yaml: finetune.drop_last leaves no batch of {cfg.batch_size} from "
                        f"{len(train_labels)} training images: set finetune.drop_last: false or a smaller batch_size")
    params.check_crop_padding(cfg.crop_padding, train_images.shape[1])
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    fast_model = devices.maybe_compile(trained, p.compile)

    def validate():
        """Each process predicts its share of the val images; the sums are added up across them."""
        mine = torch.arange(rank, len(val_labels), world, device=device)
        batches = inputs.image_inputs(val_images[mine], network.preprocess, p.data.image_size, p.data.crop_pct,
                                      p.evaluate.batch_size, device)
        logits = loop.predict(fast_model, batches, device)
        labels = val_labels[mine].cpu()
        loss_sum, correct, count = loop.summed_across_processes(
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
            (logits.argmax(1) == labels).sum(), len(labels))
        return loss_sum / count, correct / count

    checkpoints = Checkpoints(CHECKPOINTS / key[:16] / "last.pt", key, device, cfg.checkpoint_interval_s) \
        if cfg.nodes == 1 else None
    training = loop.Training(fast_model, groups, lambda generator: train_batches(
                                 train_images, train_labels, cfg, p.data, network.preprocess, generator, rank, world),
                             len(train_labels), validate if len(val_labels) else None, state_of=model)
    try:
        fitted = loop.fit(training, cfg, p.seed, device, LIVE, checkpoints)
    except RuntimeError as error:  # gloo and NCCL raise it (or DistError, a subclass) when a peer is lost
        if cfg.nodes == 1 or not isinstance(error, dist.DistError) and "gloo" not in str(error):
            raise
        raise UserError(f"finetune: lost another node ({str(error).splitlines()[0][:120]}): it stopped or died; "
                        "run the stage again on this node and --join on the others") from None
    if devices.is_main_process():
        loop.save_trained(outputs.TRAINED["finetune"], fitted, "model")
        if checkpoints:
            shutil.rmtree(checkpoints.path.parent, ignore_errors=True)  # none was written if it ran one epoch
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


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


def run_under_torchrun(cfg: params.FinetuneParams, first_node: bool) -> None:
    """Runs `processes` copies of the stage on this node with torchrun's own code (torch.distributed.run);
    with several nodes, they meet at the first node's c10d rendezvous. Its failures become one line."""
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read as torchrun's modules load: their logs would bury that line
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its modules that ignore LOGLEVEL

    if cfg.nodes == 1:
        launch = ["--standalone", f"--nproc-per-node={cfg.processes}"]
    else:
        launch = [f"--nnodes={cfg.nodes}", f"--nproc-per-node={cfg.processes}", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={cfg.rendezvous}", "--rdzv-id=finetune",
                  f"--rdzv-conf=join_timeout={cfg.join_timeout_s:g}", "--max-restarts=0"]
    print(" ".join(["torchrun", *launch, "-m", "stages.finetune"]), flush=True)
    os.environ[devices.WRITER_NODE] = "1" if first_node else "0"
    with tempfile.TemporaryDirectory() as said:
        os.environ[errors.PROCESS_ERRORS] = said
        try:
            run(parse_args([*launch, "-m", "stages.finetune"]))
        except RendezvousTimeoutError as error:
            raise UserError(f"finetune: the {cfg.nodes} nodes did not all meet at {cfg.rendezvous} within "
                            f"{cfg.join_timeout_s:g} s ({type(error).__name__}): start `python -m stages.finetune "
                            "--join` on the others (same commit, params.yaml and data/prepared), or raise "
                            "finetune.join_timeout_s") from None
        except RendezvousError as error:  # the process that hosts the rendezvous's store is gone, or never came
            raise UserError(f"finetune: lost, or never reached, the rendezvous at {cfg.rendezvous} "
                            f"({type(error).__name__}): a node stopped, or the first one is not running: run the "
                            "stage there first, then `python -m stages.finetune --join` on the others") from None
        except ChildFailedError as failure:
            line = errors.said_by_processes(Path(said))
            if line:
                raise UserError(line) from None
            codes = [f.exitcode for f in failure.failures.values()]
            raise UserError(f"finetune: a process on this node failed with exit code {codes[0]}") from None


def same_inputs_on_every_node(key: str, world: int) -> None:
    """Every process's fingerprint against the writer's: a node with other params or data says so."""
    found = [None] * world
    dist.all_gather_object(found, (devices.is_main_process(), key))
    first = next(k for writer, k in found if writer)
    fix = "the same commit and params.yaml, then `dvc pull` or `dvc repro prepare-data`"
    if key != first:
        raise UserError(f"finetune --join: params.yaml or data/prepared here differ from the first node's: use {fix}")
    if any(k != first for _, k in found):
        raise UserError(f"finetune: a joining node's params.yaml or data/prepared differ from this node's: give it {fix}")


def fingerprint(p: params.Params) -> str:
    """What a checkpoint must have been written for, to be resumed: the params and the data."""
    relevant = {"seed": p.seed, "model": p.model, "weights": p.weights, "device": p.device, "compile": p.compile,
                "image_size": p.data.image_size, "crop_pct": p.data.crop_pct, "finetune": asdict(p.finetune),
                "train_per_class": p.data.train_per_class,
                "evaluate_batch_size": p.evaluate.batch_size, "data": (outputs.PREPARED / "manifest.json").read_text(),
                "labels": hashlib.sha256((outputs.PREPARED / "train_labels.npy").read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

