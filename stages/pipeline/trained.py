"""What a training stage hands to evaluate: models/<stage>/model.pt, and the summary of its
DVCLive record (live/<stage>/metrics.json). Both strategies, the linear probe included, write
them here and evaluate reads them here, so that no key is named anywhere else."""
from pathlib import Path

import torch
from torch import nn

from stages.model.backbones import load_tensors
from stages.pipeline import outputs
from stages.pipeline.errors import UserError

PART = {"feature_extraction": "head", "finetune": "model", "lp_ft": "model"}  # what each strategy's model.pt holds


def save(strategy: str, state: dict, **facts) -> None:
    """The trained part's state, and facts about it (the epoch, the probe's L2); no timings, so that
    identical runs write identical bytes. What training cost is in the summary."""
    torch.save({PART[strategy]: {k: v.cpu() for k, v in state.items()}, **facts}, outputs.TRAINED[strategy])


def load_into(module: nn.Module, strategy: str) -> dict:
    """Loads model.pt's trained part (PART: a network's head, or its whole model) into `module`;
    returns the facts saved with it."""
    path = outputs.TRAINED[strategy]
    part = PART[strategy]
    try:
        saved = load_tensors(path)
        module.load_state_dict(saved[part])
    except (KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"{path} does not hold this model's {part} ({error.__class__.__name__}): "
                        "rerun its stage with dvc repro -f") from None
    return {key: value for key, value in saved.items() if key != part}


def summary(time_s: float, images: int, train_images: int, trainable_params: int, world_size: int = 1,
            steps: int | None = None, best_val: float | None = None, l2: float | None = None) -> dict:
    """DVCLive's summary of a training run: `images` were seen in `time_s` seconds of training; `best_val`:
    the chosen state's validation accuracy; `l2`: the linear probe's L2 strength."""
    found = {"time_s": round(time_s, 2), "images_per_s": round(images / time_s, 1), "train_images": train_images,
             "steps": steps, "trainable_params": trainable_params, "world_size": world_size,
             "best_val_accuracy": best_val, "probe_l2": l2}
    return {key: value for key, value in found.items() if value is not None}


def time_s(strategy: str) -> float:
    """The training's seconds, as its summary records them."""
    return outputs.read_json(summary_file(strategy))["time_s"]


def summary_file(strategy: str) -> Path:
    return outputs.LIVE[strategy] / "metrics.json"
