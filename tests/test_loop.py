import math

import pytest
import torch
from torch import nn

from stages.model import inference
from stages.training import loop
from stages.training.checkpoints import Checkpoints, host_copy
from stages.pipeline.params import TrainParams
from tests.conftest import write_malicious


def cfg(**changes) -> TrainParams:
    values = dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0, epochs=6, min_steps=0,
                  batch_size=16, schedule="constant", warmup_epochs=0, patience=None, label_smoothing=0.0)
    return TrainParams(**{**values, **changes})


def test_warmup_then_cosine_per_step():
    assert [loop.lr_factor(s, 4, 12, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert loop.lr_factor(8, 4, 12, "cosine") == 0.5 * (1 + math.cos(math.pi / 2))
    assert loop.lr_factor(9, 4, 12, "constant") == 1.0


def fit(tmp_path, config: TrainParams, val_accuracies=None, validation=True, checkpoint=None, start=False,
        watched=True):
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
        loss, accuracy = inference.loss_and_accuracy(inference.predict(model, [(x, len(x))], torch.device("cpu")), y)
        return loss, next(scripted, accuracy)

    training = loop.Training(model, [{"params": model.parameters(), "lr": config.lr}], batches, len(y),
                             validate if validation else None, start_is_a_candidate=start)
    return loop.fit(training, config, 0, torch.device("cpu"), tmp_path / "live",
                    Checkpoints(checkpoint, "test") if checkpoint else None, watched)


def checkpoint_file(folder):
    """Where Checkpoints(folder, "test", ...) keeps its file."""
    return folder / "test" / "last.pt"


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_fit_learns_with_each_optimizer_and_logs_every_epoch_with_dvclive(tmp_path, optimizer):
    fitted = fit(tmp_path, cfg(optimizer=optimizer, schedule="cosine", warmup_epochs=1))
    assert len(fitted.history) == 6 and fitted.history[-1]["val_accuracy"] > 0.95
    assert (tmp_path / "live/plots/metrics/val/accuracy.tsv").read_text().count("\n") == 7  # header + 6
    summary = loop_summary(tmp_path)
    assert summary["step"] == 5 and summary["trainable_params"] == 6 and summary["time_s"] > 0


@pytest.mark.parametrize("validation", [True, False])
def test_a_heads_record_without_dvclive_is_dvclives_files(tmp_path, validation):
    for watched in (True, False):  # DVCLive's Live, then Record
        fit(tmp_path / str(watched), cfg(epochs=3, patience=2 if validation else None), validation=validation,
            watched=watched)
    live, record = tmp_path / "True/live", tmp_path / "False/live"
    curves = sorted(f.relative_to(live) for f in (live / "plots").rglob("*.tsv"))
    assert curves == sorted(f.relative_to(record) for f in (record / "plots").rglob("*.tsv"))
    assert len(curves) == (4 if validation else 2)
    for curve in curves:  # same epochs, same values: the fit is deterministic on the CPU
        assert (live / curve).read_text() == (record / curve).read_text()
    timings = ("time_s", "images_per_s")
    assert ({k: v for k, v in loop_summary(tmp_path / "True").items() if k not in timings} ==
            {k: v for k, v in loop_summary(tmp_path / "False").items() if k not in timings})
    other = loop.Record(None)  # a torchrun worker that does not write
    other.log_metric("train/loss", 1.0)
    other.end()


def loop_summary(tmp_path):
    import json
    return json.loads((tmp_path / "live/metrics.json").read_text())


def test_the_best_epoch_is_kept_and_patience_stops_early(tmp_path):
    fitted = fit(tmp_path, cfg(patience=2), val_accuracies=[0.5, 0.9, 0.8, 0.85, 0.95, 0.99])
    assert fitted.epoch == 2 and len(fitted.history) == 4
    assert fitted.state.keys() == {"weight", "bias"}
    assert loop_summary(tmp_path)["best_epoch"] == 2


def test_the_starting_point_is_kept_when_no_epoch_beats_it_on_validation(tmp_path):
    fitted = fit(tmp_path, cfg(epochs=3), val_accuracies=[0.9, 0.5, 0.8, 0.85], start=True)
    assert fitted.epoch == 0 and fitted.best_val == 0.9 and len(fitted.history) == 3
    assert "the starting point" in loop.chosen(fitted)
    torch.manual_seed(0)
    torch.randn(64, 2), torch.randn(64, 2)  # as fit() draws its data, before its model
    initial = nn.Linear(2, 2).state_dict()
    assert all(torch.equal(fitted.state[k], initial[k]) for k in initial)
    assert fit(tmp_path / "later", cfg(epochs=3), val_accuracies=[0.9, 0.5, 0.95, 0.85], start=True).epoch == 2


def test_without_validation_the_last_epoch_is_the_result(tmp_path):
    fitted = fit(tmp_path, cfg(epochs=3), validation=False)
    assert fitted.epoch == 3 and "val_accuracy" not in fitted.history[-1]
    assert not (tmp_path / "live/plots/metrics/val").exists()
    assert (tmp_path / "live/plots/metrics/train/accuracy.tsv").read_text().count("\n") == 4


def test_a_corrupt_or_malicious_checkpoint_is_ignored_with_a_warning(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    for name, write in (("truncated", lambda p: p.write_bytes(b"PK\x03\x04 truncated")),
                        ("malicious", lambda p: write_malicious(p, marker))):
        checkpoint = checkpoint_file(tmp_path / name)
        checkpoint.parent.mkdir(parents=True)
        write(checkpoint)
        fitted = fit(tmp_path / name, cfg(epochs=2), checkpoint=tmp_path / name)
        assert len(fitted.history) == 2
        warning = capsys.readouterr().err
        assert f"warning: {checkpoint}" in warning and "training starts over" in warning
    assert not marker.exists()


def test_host_copies_are_copies_with_the_same_memory_layout():
    weight = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    state = {"model": {"weight": weight}, "history": [{"epoch": 1}], "betas": (0.9, 0.99)}
    copied = host_copy(state)
    assert copied == {**state, "model": copied["model"]} and torch.equal(copied["model"]["weight"], weight)
    assert copied["model"]["weight"].stride() == weight.stride()  # a fused optimizer resumed on it needs these
    weight.add_(1)
    assert not torch.equal(copied["model"]["weight"], weight)


def test_checkpoints_are_written_once_their_interval_of_training_has_passed(tmp_path):
    every_epoch = Checkpoints(tmp_path / "a", "test", interval_s=0)
    fit(tmp_path / "a", cfg(epochs=3), checkpoint=tmp_path / "a")
    assert len(every_epoch.load()["progress"]["history"]) == 2  # after epochs 1 and 2; the stage saves the last
    assert Checkpoints(tmp_path / "a", "other").load() is None  # another run's identity
    rarely = Checkpoints(tmp_path / "b", "test", interval_s=3600)
    assert [rarely.due(0.4) for _ in range(3)] == [False, False, False]
    assert Checkpoints(tmp_path / "c", "test", interval_s=1.0).due(1.0)
