import math

import torch
from torch import nn

from stages import loop
from stages.params import TrainParams


def cfg(**changes) -> TrainParams:
    values = dict(epochs=6, batch_size=16, lr=0.05, weight_decay=0.0, schedule="constant", warmup_epochs=0,
                  patience=None)
    return TrainParams(**{**values, **changes})


def test_warmup_then_cosine_per_step():
    assert [loop.lr_factor(s, 4, 12, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert loop.lr_factor(8, 4, 12, "cosine") == 0.5 * (1 + math.cos(math.pi / 2))
    assert loop.lr_factor(9, 4, 12, "constant") == 1.0


def fit(tmp_path, config: TrainParams, val_accuracies=None):
    """A linear classifier on two separable blobs; `val_accuracies` replaces validation if given."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(64, 2) + 3, torch.randn(64, 2) - 3])
    y = torch.cat([torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)])
    model = nn.Linear(2, 2)
    scripted = iter(val_accuracies or [])

    def batches(generator):
        order = torch.randperm(len(y), generator=generator)
        return ((x[i], y[i]) for i in order.split(config.batch_size))

    def validate():
        loss, accuracy = loop.loss_and_accuracy(loop.predict(model, [x], torch.device("cpu")), y)
        return loss, next(scripted, accuracy)

    return loop.fit(model, [{"params": model.parameters(), "lr": config.lr}], batches, len(y), validate,
                    config, 0, torch.device("cpu"), tmp_path / "live")


def test_fit_learns_and_logs_every_epoch_with_dvclive(tmp_path):
    fitted = fit(tmp_path, cfg(schedule="cosine", warmup_epochs=1))
    assert len(fitted.history) == 6 and fitted.history[-1]["val_accuracy"] > 0.95
    assert (tmp_path / "live/plots/metrics/val/accuracy.tsv").read_text().count("\n") == 7  # header + 6


def test_the_best_epoch_is_kept_and_patience_stops_early(tmp_path):
    fitted = fit(tmp_path, cfg(patience=2), val_accuracies=[0.5, 0.9, 0.8, 0.85, 0.95, 0.99])
    assert fitted.best_epoch == 2 and len(fitted.history) == 4
    assert fitted.best_state.keys() == {"weight", "bias"}
