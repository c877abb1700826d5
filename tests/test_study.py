import json
import sys

import pandas as pd

from stages import report
from tests.conftest import run

TINY = ["-S", "data.source=synthetic", "-S", "weights=none", "-S", "data.image_size=64",
        "-S", "train_heads.epochs=2", "-S", "finetune.epochs=1"]


def fake(model, strategy, seed, accuracy=None, error=None):
    metrics = {} if accuracy is None else {"test": {"accuracy": accuracy, "images_per_s": 100.0},
                                           "train": {"time_s": 2.0, "images_per_s": 50.0, "trainable_params": 10},
                                           "run": {"device": "cpu (2 threads)"}}
    params = {"model": model, "strategy": strategy, "seed": seed, "weights": "none",
              "data": {"source": "synthetic", "root": "data/raw", "image_size": 64}}
    return {"name": f"{model}-{strategy}-{seed}", "params": params, "metrics": metrics, "error": error}


def test_the_table_gives_mean_and_std_over_seeds_and_keeps_failures(tmp_path):
    records = [fake("alexnet", "finetune", 0, 0.80), fake("alexnet", "finetune", 1, 0.90),
               fake("vgg16", "feature_extraction", 0, error="error: out of memory")]
    table = report.results_table(records)
    row = table.set_index(["model", "strategy"]).loc[("alexnet", "finetune")]
    assert row["seeds"] == "0,1" and abs(row["accuracy_mean"] - 0.85) < 1e-9
    assert abs(row["accuracy_std"] - 0.0707107) < 1e-6 and row["published_accuracy"] == 0.8917
    failed = table.set_index(["model", "strategy"]).loc[("vgg16", "feature_extraction")]
    assert pd.isna(failed["accuracy_mean"]) and "out of memory" in failed["failed"]
    report.write_report(table, records, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert "0.8500 ± 0.0707" in markdown and "| failed" in markdown and "device: cpu (2 threads)" in markdown
    assert len(pd.read_csv(tmp_path / "results.csv")) == 2 and (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_the_study_runs_the_grid_as_queued_dvc_experiments(dvc_project):
    study = [sys.executable, "-m", "stages.study", "--models", "alexnet,resnet18,alexnot", *TINY]
    result = run(*study, check=False)
    assert result.returncode != 0 and "2 experiment(s) failed" in result.stderr
    table = pd.read_csv(dvc_project / "study/results.csv")
    assert len(table) == 6 and table["accuracy_mean"].notna().sum() == 4
    failed = table[table["model"] == "alexnot"]["failed"]
    assert failed.str.contains("model is not a torchvision classification model").all()
    assert (dvc_project / "study/accuracy.png").stat().st_size > 10_000
    shown = json.loads(run("dvc", "exp", "show", "--json").stdout)
    names = [rev["name"] for b in shown for e in b["experiments"] or [] for rev in e["revs"]]
    assert sum(name.startswith(("alexnet-", "resnet18-")) for name in names) == 4

    again = run(sys.executable, "-m", "stages.study", "--models", "alexnet,resnet18", *TINY)
    assert "4 of 4 experiments already done; queueing 0" in again.stdout
    assert len(pd.read_csv(dvc_project / "study/results.csv")) == 4
