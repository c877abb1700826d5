"""One training loop for both strategies: the head on cached features, or the model on images.

SGD (with momentum, optionally Nesterov), Adam or AdamW with one learning rate per parameter
group, an optional warm-up and cosine schedule per step, and either the best epoch by
validation accuracy (with optional early stopping) or, without a validation split, the last
epoch. DVCLive records a fine-tune epoch by epoch; a head's fit writes the same files at its end
(Record). Optional checkpoints (stages/training/checkpoints.py) let an interrupted run resume
exactly: each epoch seeds its own random numbers.
Under torchrun (finetune.processes > 1) the epoch's sums are added up across processes, and
only rank 0 writes the record and the checkpoint.
"""
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.model.devices import autocast
from stages.pipeline import outputs, trained
from stages.pipeline.params import TrainParams
from stages.training.checkpoints import Checkpoints, host_copy

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
Validate = Callable[[], tuple[float, float]]


@dataclass
class Fitted:
    state: dict  # the model's state_dict: at its best validation accuracy, or after the last epoch
    epoch: int  # 1-based: the epoch that `state` comes from
    history: list[dict]  # one record per epoch: losses, accuracies, seconds
    train_time_s: float  # training epochs only, resumed runs included
    best_val: float | None  # the chosen state's validation accuracy (None without validation)


@dataclass
class Progress:
    """What a fit has settled after each epoch: exactly what a checkpoint keeps besides the tensors
    that training goes on updating (the model's, the optimizer's) and the scheduler's step."""
    history: list[dict] = field(default_factory=list)  # one record per epoch
    best_acc: float = -1.0  # the best validation accuracy so far
    best_epoch: int = 0  # 1-based; without validation, the last epoch; 0: the starting point
    best_state: dict | None = None  # a host copy of the model's state at best_epoch (with validation)

    def add(self, record: dict, model: nn.Module) -> None:
        self.history.append(record)
        if "val_accuracy" not in record:
            self.best_epoch = record["epoch"]  # the last epoch is the result: its state is taken after the loop
        elif record["val_accuracy"] > self.best_acc:
            self.best_acc, self.best_epoch = record["val_accuracy"], record["epoch"]
            self.best_state = host_copy(model.state_dict())

    def settled(self) -> dict:
        """For a checkpoint: best_state is replaced, never updated, so it is kept as it is."""
        return {**vars(self), "history": list(self.history)}


def make_optimizer(cfg: TrainParams, param_groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, foreach=True)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(param_groups, weight_decay=cfg.weight_decay, fused=True)  # fused: 40 % faster on CPU too


@dataclass
class Training:
    """What a stage hands to fit."""
    model: nn.Module  # what runs forward: the module itself, or its torch.compile'd or DDP wrapper
    param_groups: list[dict]  # for the optimizer: parameters, and a learning rate each
    batches: Callable[[torch.Generator], Batches]  # one pass's (inputs, labels), drawn with its generator
    n_train: int  # training images or feature vectors
    validate: Validate | None = None  # (loss, accuracy) on val; None: no val split, the last epoch is the result
    state_of: nn.Module | None = None  # whose state_dict is the result, when `model` wraps it
    start_is_a_candidate: bool = False  # the starting point (a trained head) may be the best state by validation
    norms_in_eval: bool = False  # every BatchNorm keeps its running statistics (else only the frozen ones)


def fit(training: Training, cfg: TrainParams, seed: int, device: torch.device, live_dir: Path,
        checkpoints: Checkpoints | None = None, watched: bool = True) -> Fitted:
    """Trains for cfg.epochs (or until early stopping), resuming from `checkpoints` if they hold this run;
    recorded in `live_dir` (open_live: with DVCLive, epoch by epoch, if `watched`)."""
    model, validate, state_of = training.model, training.validate, training.state_of or training.model
    optimizer = make_optimizer(cfg, training.param_groups)
    steps_per_epoch = cfg.steps_per_epoch(training.n_train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch, cfg.schedule))
    progress = resumed(checkpoints, state_of, optimizer, scheduler)
    if training.start_is_a_candidate and validate and not progress.history:
        progress.best_acc, progress.best_state = validate()[1], host_copy(state_of.state_dict())
        print(f"starting point: val accuracy {progress.best_acc:.4f}")
    live = open_live(live_dir, watched)
    for record in progress.history:  # the logs of a resumed run equal those of an uninterrupted one
        log_epoch(live, record, progress.best_epoch)
    epochs = tqdm(range(len(progress.history), cfg.epochs), desc="epochs", unit="epoch",
                  initial=len(progress.history), total=cfg.epochs)
    for epoch in epochs:
        if validate and cfg.patience and epoch - progress.best_epoch >= cfg.patience:
            print(f"early stop: no better val accuracy for {cfg.patience} epochs")
            break
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + epoch)  # order, augmentation
        started = time.perf_counter()
        train_loss, train_acc, seen = train_one_epoch(model, optimizer, scheduler, epoch_batches(
            training, generator, steps_per_epoch), steps_per_epoch, device, f"epoch {epoch + 1}", cfg.label_smoothing,
            training.norms_in_eval)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                  "seconds": time.perf_counter() - started, "images": seen}
        if validate:
            record["val_loss"], record["val_accuracy"] = validate()
            epochs.set_postfix(val_accuracy=f"{record['val_accuracy']:.4f}")
        progress.add(record, state_of)
        log_epoch(live, record, progress.best_epoch)
        if checkpoints and is_writer() and epoch + 1 < cfg.epochs and checkpoints.due(record["seconds"]):
            checkpoints.save(  # none after the last epoch: the stage saves the model
                changing={"model": state_of.state_dict(), "optimizer": optimizer.state_dict()},
                settled={"scheduler": scheduler.state_dict(), "progress": progress.settled()})
    fitted = Fitted(progress.best_state if validate else {k: v.detach().cpu() for k, v in state_of.state_dict().items()},
                    progress.best_epoch, progress.history, sum(r["seconds"] for r in progress.history),
                    progress.best_acc if validate else None)
    live.summary.update(trained.summary(
        fitted.train_time_s, sum(r["images"] for r in progress.history), training.n_train,
        steps=steps_per_epoch * len(progress.history), trainable_params=trainable_count(state_of),
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        best_val=fitted.best_val))
    live.end()
    return fitted


def resumed(checkpoints: Checkpoints | None, model: nn.Module, optimizer, scheduler) -> Progress:
    """The progress of the run that `checkpoints` hold, its tensors loaded; a fresh one if none."""
    saved = checkpoints.load() if checkpoints else None
    if not saved:
        return Progress()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    progress = Progress(**saved["progress"])
    print(f"resuming from {checkpoints.path} after epoch {len(progress.history)}")
    return progress


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def is_writer() -> bool:
    """The one process that writes files: alone, or rank 0 of torchrun's workers."""
    return not dist.is_initialized() or dist.get_rank() == 0


def chosen(fitted: Fitted) -> str:
    """Which epoch's state is the result, and what training took."""
    if fitted.epoch == 0:
        which = f"the starting point: val accuracy {fitted.best_val:.4f}, better than every epoch's"
    elif fitted.best_val is not None:
        which = f"best epoch {fitted.epoch}: val accuracy {fitted.best_val:.4f}"
    else:
        which = f"last epoch {fitted.epoch}: train accuracy {fitted.history[-1]['train_accuracy']:.4f}"
    return f"{which}, {fitted.train_time_s:.1f} s of training"


def epoch_batches(training: Training, generator: torch.Generator, steps: int) -> Batches:
    """An epoch's `steps` batches: passes over the training data, each freshly shuffled, cut at `steps`
    (one pass, unless min_steps asks for more steps than a pass has)."""
    passes = (training.batches(generator) for _ in itertools.count())
    return itertools.islice(itertools.chain.from_iterable(passes), steps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return 1.0


def train_one_epoch(model, optimizer, scheduler, batches: Batches, steps: int, device, desc: str,
                    label_smoothing: float = 0.0, norms_in_eval: bool = False):
    model.train()
    keep_norms_in_eval(model, every=norms_in_eval)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in tqdm(batches, desc=desc, total=steps, unit="batch", leave=False, mininterval=1):
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(y)  # summed on the device: no sync per step
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    loss_sum, correct, seen = summed_across_processes(loss_sum, correct.float(), float(seen))
    return loss_sum / seen, correct / seen, int(seen)


def keep_norms_in_eval(model: nn.Module, every: bool = False) -> None:
    """BatchNorm layers keep their running statistics (ImageNet's): those whose weights are frozen, or
    every one (finetune.freeze_norm_stats: with few images, their statistics would drift)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (every or not any(
                p.requires_grad for p in module.parameters(recurse=False))):
            module.eval()


def summed_across_processes(*values) -> list[float]:
    """The values added up over every torchrun process (as they are, with one process)."""
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
    if dist.is_initialized():
        totals = totals.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(totals)
    return totals.tolist()


def open_live(folder: Path, watched: bool = True):
    """The fit's record in `folder`, on the process that writes: DVCLive's Live when the fit is
    `watched` (a fine-tune: its curves and summary update every epoch) and DVCLive is installed;
    else a Record, the same files written at the end. Elsewhere a Record that writes nothing."""
    if not is_writer():
        return Record(None)
    try:
        from dvclive import Live
    except ImportError:  # a GPU machine with torch but no DVC, running the stages by hand
        return Record(folder)
    return Live(str(folder), save_dvc_exp=False, dvcyaml=None, report=None) if watched else Record(folder)


class Record:
    """DVCLive's files for a fit, written at its end without DVCLive: metrics.json (the last value of
    each metric, the last step, the summary), plots/metrics/<name>.tsv, plots/custom/<name>.json.
    For a head's fit, which needs no live view and often takes less time than DVCLive's import and
    repository (0.3-0.4 s here)."""
    def __init__(self, folder: Path | None):
        self.folder, self.summary, self.step, self.curves, self.plots = folder, {}, 0, {}, {}

    def log_metric(self, name: str, value: float) -> None:
        self.curves.setdefault(name, []).append(f"{self.step}\t{value}\n")
        split, metric = name.split("/")
        self.summary.setdefault(split, {})[metric] = value

    def log_plot(self, name: str, datapoints: list[dict], **options) -> None:
        self.plots[name] = datapoints  # options: dvc.yaml's plots section says how to draw it

    def next_step(self) -> None:
        self.summary["step"] = self.step
        self.step += 1

    def end(self) -> None:
        if not self.folder:
            return
        outputs.fresh_folder(self.folder)  # as DVCLive empties it when it starts
        for name, rows in self.curves.items():
            path = self.folder / "plots" / "metrics" / f"{name}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"step\t{name.split('/')[-1]}\n" + "".join(rows))
        for name, datapoints in self.plots.items():
            outputs.write_json(self.folder / "plots" / "custom" / f"{name}.json", datapoints)
        outputs.write_json(self.folder / "metrics.json", self.summary)


def log_epoch(live, record: dict, best_epoch: int) -> None:
    """DVCLive's step, and the epoch's curves; with a val split, the best epoch so far."""
    for split in ("train", "val"):
        if f"{split}_loss" in record:
            live.log_metric(f"{split}/loss", record[f"{split}_loss"])
            live.log_metric(f"{split}/accuracy", record[f"{split}_accuracy"])
    if "val_loss" in record:
        live.summary["best_epoch"] = best_epoch
    live.next_step()
