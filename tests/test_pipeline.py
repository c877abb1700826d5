"""The real DVC pipeline on the synthetic source, in a scratch git repo."""
import json
import re
import signal
import subprocess
import sys
import time

import yaml

from tests.conftest import FAST, run, set_params, stage

CHANCE = 0.1


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def restored_stages(output: str) -> list[str]:
    return re.findall(r"Stage '([\w-]+)' is cached - skipping run", output)


def test_dvc_exp_run_prepare_data_on_the_synthetic_source(dvc_project):
    result = run("dvc", "exp", "run", "prepare-data", "-S", "data.source=synthetic")
    assert ran_stages(result.stdout) == ["check-params", "prepare-data"]
    manifest = json.loads((dvc_project / "data/prepared/manifest.json").read_text())
    assert [manifest["splits"][s]["count"] for s in ("train", "val", "test")] == [540, 60, 300]


def test_a_bad_param_stops_dvc_before_any_output_is_removed(dvc_project):
    run("dvc", "exp", "run", "prepare-data", "-S", "data.source=synthetic")
    result = run("dvc", "exp", "run", "prepare-data", "-S", "data.val_fraction=1.5", check=False)
    assert result.returncode != 0 and "data.val_fraction must be in (0, 1)" in result.stderr + result.stdout
    assert (dvc_project / "data/prepared/train_images.npy").exists()


def metrics(project) -> dict:
    return json.loads((project / "metrics/metrics.json").read_text())


def test_feature_extraction_then_finetune_as_dvc_experiments(dvc_project):
    set_params(dvc_project / "params.yaml", FAST)
    run("git", "commit", "-qam", "fast params")
    first = run("dvc", "repro")
    assert ran_stages(first.stdout) == ["check-params", "prepare-data", "cache-features", "train-heads",
                                        "finetune", "evaluate"]
    fe = metrics(dvc_project)
    assert fe["test"]["accuracy"] > 2 * CHANCE
    assert fe["cache_check"]["prediction_agreement"] >= 0.99 and fe["cache_check"]["max_logit_diff"] < 1e-2
    assert (dvc_project / "plots/confusion.png").stat().st_size > 10_000
    assert ran_stages(run("dvc", "repro").stdout) == []

    changed = run("dvc", "exp", "run", "-S", "train_heads.lr=0.0005")
    assert ran_stages(changed.stdout) == ["check-params", "train-heads", "evaluate"]

    finetune = run("dvc", "exp", "run", "-S", "strategy=finetune", "-S", "train_heads.lr=0.0005")
    assert "prepare-data" not in ran_stages(finetune.stdout)
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    features = next(o for o in lock["stages"]["cache-features"]["outs"] if o["path"] == "data/features")
    assert features["nfiles"] == 1 and features["size"] < 1000  # only the "skipped" manifest
    ft = metrics(dvc_project)
    assert ft["test"]["accuracy"] > 2 * CHANCE and "cache_check" not in ft
    assert ft["train"]["trainable_params"] > fe["train"]["trainable_params"]

    back = run("dvc", "exp", "run", "-S", "strategy=feature_extraction", "-S", "train_heads.lr=0.0005")
    assert {"cache-features", "train-heads", "evaluate"} <= set(restored_stages(back.stdout))
    assert "cache-features" not in ran_stages(back.stdout) and "train-heads" not in ran_stages(back.stdout)
    shown = json.loads(run("dvc", "exp", "show", "--json").stdout)
    assert sum(len(e["revs"]) for baseline in shown for e in baseline["experiments"] or []) == 3


def test_an_interrupted_finetune_resumes_to_the_same_result(project):
    set_params(project / "params.yaml", {**FAST, "strategy": "finetune", "finetune.epochs": 3})
    stage("prepare_data")
    stage("finetune")
    stage("evaluate")
    uninterrupted = metrics(project)["test"]
    del uninterrupted["images_per_s"]

    checkpoint = project / "checkpoints/finetune/last.pt"
    checkpoint.unlink()
    process = subprocess.Popen([sys.executable, "-m", "stages.finetune"], stderr=subprocess.DEVNULL)
    while not checkpoint.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (project / "models/finetune/model.pt").exists()
    assert "resuming from checkpoints/finetune/last.pt after epoch" in stage("finetune").stdout
    stage("evaluate")
    resumed = metrics(project)["test"]
    assert {k: resumed[k] for k in uninterrupted} == uninterrupted


def test_cached_features_are_identical_across_runs_on_the_cpu(project):
    set_params(project / "params.yaml", FAST)
    stage("prepare_data")
    stage("cache_features")
    first = (project / "data/features/train_flip.npy").read_bytes()
    stage("cache_features")
    assert (project / "data/features/train_flip.npy").read_bytes() == first
