"""The L-BFGS linear probe: converged fits, the L2 search on validation, and the folded standardisation."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.training import probe
from tests.conftest import LEARNS, full_model_accuracy, run, set_params, stage

PROBE = {**LEARNS, "train_heads.solver": "lbfgs", "train_heads.trainable": "last", "features.flip": True}


def blobs(n: int, dim: int = 20, classes: int = 4, noise: float = 2.0, seed: int = 0):
    """Gaussian classes around random centres, offset and scaled so that standardising matters."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = centres[y] + noise * torch.randn(n, dim, generator=g)
    return 50 + 10 * x, y


def test_a_fit_converges_to_the_regularised_minimum():
    x, y = blobs(400)
    x = probe.Standardiser.of(x)(x)
    l2 = 3.0
    weight, bias, _ = probe.fit(x, y, l2, 4)
    weight.requires_grad_(), bias.requires_grad_()
    loss = F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + l2 / 2 * weight.square().sum()
    loss.backward()
    assert weight.grad.abs().max() / len(y) < 1e-4 and bias.grad.abs().max() / len(y) < 1e-4
    stronger, _, _ = probe.fit(x, y, 100 * l2, 4)
    assert stronger.norm() < weight.norm()


def test_the_folded_standardisation_gives_the_same_logits_on_raw_features():
    x, y = blobs(200)
    standardise = probe.Standardiser.of(x)
    weight, bias, _ = probe.fit(standardise(x), y, 1.0, 4)
    folded_weight, folded_bias = standardise.fold(weight, bias)
    torch.testing.assert_close(x @ folded_weight.T + folded_bias, standardise(x) @ weight.T + bias,
                               rtol=1e-4, atol=1e-3)


def test_the_search_picks_a_strength_on_validation_coarse_then_fine_and_deterministically():
    x, y = blobs(300, noise=3.0)
    val_x, val_y = blobs(200, noise=3.0, seed=1)
    standardise = probe.Standardiser.of(x)
    tried, chosen = probe.search_l2(standardise(x), y, standardise(val_x), val_y, 4)
    decades = [r["log10_l2"] for r in tried]
    assert decades == sorted(decades) and {-6, -4, -2, 0, 2, 4, 6} <= set(decades) and -6 <= min(decades) <= max(decades) <= 6
    assert min(abs(d - chosen["log10_l2"]) for d in decades if d != chosen["log10_l2"]) == probe.FINEST_STEP
    assert chosen["val_accuracy"] == max(r["val_accuracy"] for r in tried)
    assert chosen["val_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert probe.search_l2(standardise(x), y, standardise(val_x), val_y, 4)[1] == chosen


def test_the_probe_as_a_dvc_experiment_learns_agrees_with_the_whole_model_and_never_reads_the_test_split(
        dvc_project):
    set_params(dvc_project / "params.yaml", {**PROBE, "evaluate.flip": True})
    run("git", "commit", "-qam", "probe params")
    run("dvc", "exp", "run")
    summary = json.loads((dvc_project / "live/train_heads/metrics.json").read_text())
    metrics = json.loads((dvc_project / "metrics/metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.3  # synthetic, 10 classes: chance is 0.1
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(dvc_project)  # the folded standardisation: the whole model scores as the cached path does
        assert metrics["test"]["accuracy"] == pytest.approx(full_model_accuracy(), abs=1e-6)
    search = json.loads((dvc_project / "live/train_heads/plots/custom/l2_search.json").read_text())
    assert len(search) > 1 and all(0 <= r["val_accuracy"] <= 1 for r in search)
    assert any(math.isclose(10.0 ** r["log10_l2"], summary["probe_l2"]) for r in search)  # the chosen strength
    shown = run("dvc", "exp", "show", "--json").stdout
    assert '"probe_l2": ' + json.dumps(summary["probe_l2"]) in shown
    plots = run("dvc", "plots", "show", "-o", "dvc_plots")
    assert "failed to load" not in plots.stdout + plots.stderr
    assert "Linear probe: validation accuracy per L2 strength" in (dvc_project / "dvc_plots/index.html").read_text()
    model = (dvc_project / "models/train_heads/model.pt").read_bytes()

    for path in ("data/prepared/test_images.npy", "data/prepared/test_labels.npy", "data/features/test.npy"):
        array = np.load(dvc_project / path)  # poisoned: noise of the same shape, written as a new file
        (dvc_project / path).unlink()  # never through DVC's hardlink into its cache
        np.save(dvc_project / path, np.random.default_rng(1).integers(0, 10, array.shape).astype(array.dtype))
    stage("train_heads")
    assert json.loads((dvc_project / "live/train_heads/metrics.json").read_text())["probe_l2"] == summary["probe_l2"]
    assert (dvc_project / "models/train_heads/model.pt").read_bytes() == model


@pytest.mark.parametrize("changes, message", [
    ({"train_heads.solver": "lbfgs", "train_heads.trainable": "last", "data.val_fraction": 0},
     "train_heads.solver lbfgs chooses its L2 strength"),
    ({"train_heads.solver": "lbfgs", "train_heads.trainable": "classifier"}, "lbfgs fits the last Linear alone"),
    ({"train_heads.probe_layer": "fc6", "model": "resnet18"}, "fc6 and body need AlexNet's or VGG's classifier"),
])
def test_probe_params_that_cannot_work_are_one_line(project, changes, message):
    set_params(project / "params.yaml", {**LEARNS, **changes})
    result = stage("check_inputs", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_finetuning_never_reads_the_test_split(project):
    set_params(project / "params.yaml", {**LEARNS, "strategy": "finetune", "finetune.epochs": 1})
    stage("prepare_data")
    stage("finetune")
    model = (project / "models/finetune/model.pt").read_bytes()
    for path in ("data/prepared/test_images.npy", "data/prepared/test_labels.npy"):
        array = np.load(project / path)
        (project / path).unlink()
        np.save(project / path, np.random.default_rng(1).integers(0, 10, array.shape).astype(array.dtype))
    stage("finetune")
    assert (project / "models/finetune/model.pt").read_bytes() == model
