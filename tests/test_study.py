"""The study: its grid, shards and flags, the like-for-like report, and DVC's queue end to end."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from stages.study import charts, experiments, grid as study, protocols, queue, remotes, report
from stages.pipeline import param_checks
from stages.pipeline.errors import UserError
from stages.study.table import gains_over_scratch, results, runs
from tests.conftest import REPO, TINY, processes_in, run

DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())


def fake(model="alexnet", strategy="feature_extraction", seed=0, accuracy=None, error=None, state=None, **changes):
    """A record as experiments.records gives it: params.yaml's defaults with dotted changes."""
    params = experiments.nest({**experiments.flat(DEFAULTS), **changes, "model": model, "strategy": strategy, "seed": seed})
    training = "live/train_heads/metrics.json" if strategy == "feature_extraction" else "live/finetune/metrics.json"
    metrics = {} if accuracy is None else {
        "metrics/metrics.json": {"test": {"accuracy": accuracy, "loss": 1.0}, "total_time_s": 16.0, "evaluate_time_s": 1.0,
                                 "run": {"device": "cpu (2 threads)", "cuda_visible_devices": None}},
        training: {"time_s": 5.0, "images_per_s": 50.0, "trainable_params": 10},
        "metrics/features.json": {"time_s": 10.0, "images_per_s": 200.0}}
    state = state or ("failed" if error else "success")
    return {"name": f"{model}-{strategy}-{seed}-{len(changes)}", "state": state, "params": params,
            "metrics": metrics, "error": error, "log": None}


def row(table, **where) -> pd.Series:
    chosen = table[(table[list(where)] == pd.Series(where)).all(axis=1)]
    assert len(chosen) == 1, chosen
    return chosen.iloc[0]


def test_params_yaml_defaults_are_the_notebook_protocol():
    assert protocols.protocol_of(DEFAULTS) == "notebook"


def test_rows_group_by_every_param_but_the_seed_and_name_the_settings_that_differ(tmp_path):
    records = [fake(seed=0, accuracy=0.80), fake(seed=1, accuracy=0.90),
               fake(seed=0, accuracy=0.50, **{"features.batch_size": 64}),
               fake("vgg16", seed=0, error="error: out of memory")]
    table = results(runs(records))
    assert len(table) == 3
    same = row(table, model="alexnet", settings="features.batch_size=256")
    assert same["seeds"] == "0,1" and abs(same["accuracy_mean"] - 0.85) < 1e-9
    assert abs(same["accuracy_std"] - 0.0707107) < 1e-6 and same["published_accuracy"] == 0.8132
    other = row(table, model="alexnet", settings="features.batch_size=64")
    assert other["accuracy_mean"] == 0.5 and other["runs_ok"] == 1
    failed = row(table, model="vgg16")
    assert pd.isna(failed["accuracy_mean"]) and "out of memory" in failed["problems"]
    report.write(records, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert "| settings" in markdown and "features.batch_size=64" in markdown
    assert "0.8500 ± 0.0707" in markdown and "| failed" in markdown and "device: cpu (2 threads)" in markdown
    assert len(pd.read_csv(tmp_path / "results.csv")) == 3 and (tmp_path / "accuracy.png").stat().st_size > 10_000


def test_the_two_protocols_never_average_together_and_their_name_stands_for_their_keys(tmp_path):
    readme = protocols.overrides("readme")
    records = [fake(seed=0, accuracy=0.80), fake(seed=0, accuracy=0.60, **readme), fake(seed=1, accuracy=0.70, **readme)]
    table = results(runs(records))
    assert sorted(table["protocol"]) == ["notebook", "readme"] and not table["settings"].any()
    assert row(table, protocol="notebook")["accuracy_mean"] == 0.80
    assert abs(row(table, protocol="readme")["accuracy_mean"] - 0.65) < 1e-9
    custom = results(runs(records + [fake(seed=0, accuracy=0.1, **{**readme, "train_heads.lr": 0.01})]))
    assert row(custom, protocol="custom (near readme)")["settings"] == "train_heads.lr=0.01"
    report.write(records, tmp_path)
    assert "| settings" not in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("changes, expected", [
    ({}, 0.8132),
    (protocols.overrides("readme"), "protocol differs (readme)"),
    ({"train_heads.lr": 0.01}, "protocol differs (custom)"),
    ({"data.source": "synthetic"}, "data differs (synthetic)"),
    ({"data.limit_per_class": 500}, "data differs (subset: limit_per_class 500)"),
    ({"weights": "none"}, "weights differ (none)"),
    ({"data.image_size": 64}, "image size differs (64 px)"),
    ({"model": "resnet18"}, "not in the study"),
])
def test_the_published_number_stands_only_beside_a_like_for_like_row(changes, expected):
    table = results(runs([fake(accuracy=0.5, **{"model": "alexnet", **changes})]))
    number, note = table.iloc[0][["published_accuracy", "published_note"]]
    if isinstance(expected, float):
        assert number == expected and note == ""
    else:
        assert pd.isna(number) and note == expected


def test_the_time_column_is_the_whole_cost_of_a_run(tmp_path):
    records = [fake(accuracy=0.5)]
    table = results(runs(records))
    assert table.iloc[0][["total_time_s", "features_time_s", "train_time_s", "evaluate_time_s"]].tolist() == [
        16.0, 10.0, 5.0, 1.0]
    report.write(records, tmp_path)
    assert "16.0 (10.0 + 5.0 + 1.0)" in (tmp_path / "results.md").read_text()


def exp_show_entry(name, state, seed, log=None, metrics=None, executor=True):
    """One experiment of `dvc exp show --json`, shaped as DVC 3.67 writes it."""
    params = experiments.nest({**experiments.flat(DEFAULTS), "seed": seed})
    files = {"metrics/metrics.json": {"data": metrics}} if metrics else {
        "metrics/metrics.json": {"error": {"type": "FileNotFoundError", "msg": "No such file"}}}
    local = {"root": None, "log": log, "pid": 123 if log else None, "returncode": None, "task_id": "abc"}
    return {"name": name, "revs": [{"rev": "0123456789", "name": name, "error": {"msg": "Experiment run failed",
                                                                                   "type": ""} if state == "failed" else None,
                                    "data": {"params": {"params.yaml": {"data": params}}, "metrics": files}}],
            "executor": {"state": state, "name": "dvc-task", "local": local if log or state == "queued" else None}
            if executor else None}


def test_only_a_success_counts_as_done_and_a_failure_says_why_from_its_log(tmp_path):
    log = tmp_path / "run.out"
    log.write_text("Running stage 'evaluate':\nerror: model 'x' is not a torchvision classification model\n"
                   "ERROR: failed to reproduce 'evaluate'\n")
    shown = [{"rev": "workspace", "data": {"params": {"params.yaml": {"data": DEFAULTS}}}},
             {"rev": "baseline", "experiments": [
                 exp_show_entry("queued", "queued", 1), exp_show_entry("running", "running", 2, log=str(log)),
                 exp_show_entry("failed", "failed", 3, log=str(log)), exp_show_entry("lost", "failed", 4),
                 exp_show_entry("done", "success", 5, log=str(log), metrics={"test": {"accuracy": 0.5}}),
                 exp_show_entry("cleared", "success", 6, metrics={"test": {"accuracy": 0.6}}, executor=False)]}]
    records = {r["name"]: r for r in experiments.records(shown)}
    assert {n: r["state"] for n, r in records.items()} == {
        "queued": "queued", "running": "running", "failed": "failed", "lost": "failed", "done": "success",
        "cleared": "success"}
    assert records["queued"]["error"] == "not run: still queued" and records["running"]["error"] == "not run: still running"
    assert records["failed"]["error"] == "error: model 'x' is not a torchvision classification model"
    assert records["lost"]["error"].startswith("not run: failed before it started")
    assert records["done"]["error"] is None and records["cleared"]["error"] is None
    cells = [{"model": "alexnet", "strategy": "feature_extraction", "seed": s} for s in range(1, 8)]
    done, pending, todo = study.plan(cells, experiments.workspace_params(shown), list(records.values()))
    assert [c["seed"] for c in done] == [5, 6] and [c["seed"] for c in pending] == [1, 2]
    assert [c["seed"] for c in todo] == [3, 4, 7]
    table = results(runs(list(records.values())))
    assert table.iloc[0]["runs_ok"] == 2 and table.iloc[0]["failed"] == 1
    assert "queued: not run: still queued" in table.iloc[0]["problems"]


def test_a_pulled_success_whose_metrics_the_dvc_remote_cannot_give_fails_its_row_with_why():
    entry = exp_show_entry("pulled", "success", 0, executor=False)  # its metrics/metrics.json: an error
    entry["revs"][0]["data"]["metrics"]["metrics/metrics.json"]["error"]["msg"] = \
        "[Errno 2] No storage files available: 'metrics/metrics.json'"
    record = experiments.records([{"rev": "baseline", "experiments": [entry]}])[0]
    assert record["state"] == "success" and record["error"].startswith(
        "metrics/metrics.json unreadable: [Errno 2] No storage files available") and "DVC remote" in record["error"]
    table = results(runs([record]))
    assert table.iloc[0]["failed"] == 1 and "No storage files available" in table.iloc[0]["problems"]


def test_a_set_param_reads_back_as_dvc_reads_it():
    parser = OverridesParser.create()  # what `dvc exp run -S` parses with
    for value in ["it's", "a\\b", "a\\", "a,b", "1e-3", "null", "\\'", "", "/tmp/x y", 1e-3, 1e-5, 3, None, True, 0.875]:
        parsed = parser.parse_override(f"k={protocols.value_text(value)}").value()
        assert parsed == value and type(parsed) is type(value)
    overrides = study.parse_args(["-S", "train_heads.lr=1e-3", "--protocol", "readme", "-S", "finetune.epochs=2"]).overrides
    assert overrides["train_heads.lr"] == 0.001 and isinstance(overrides["train_heads.lr"], float)
    assert overrides["finetune.epochs"] == 2 and overrides["finetune.optimizer"] == "adam"  # -S wins over the protocol


def test_the_shards_of_the_grid_cover_it_exactly_once():
    cells = study.grid(["alexnet", "vgg16", "resnet18"], ["feature_extraction", "finetune"], [0, 1], {})
    for count in (1, 2, 3, 5, 13):
        shares = [study.shard(cells, i, count) for i in range(1, count + 1)]
        together = [json.dumps(c, sort_keys=True) for share in shares for c in share]
        assert sorted(together) == sorted(json.dumps(c, sort_keys=True) for c in cells)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert study.shard(cells, 1, 2) != study.shard(cells, 2, 2)


@pytest.mark.parametrize("argv", [["--strategies", "finetuning"], ["--models", "alexnet,,vgg16"], ["--seeds", "0,x"],
                                  ["--shard", "3/2"], ["--shard", "0/2"], ["--shard", "a/b"], ["--shard", "half"], ["--protocol", "paper"],
                                  ["-S", "seed=1"], ["-S", "train_heads.lr=1e-3,1e-3"], ["--gpus", "0,0"], ["--gpus", "abc"],
                                  ["-S", "train_heads.lr=interval(0,1)"], ["-S", "no.such_key=1,2"],
                                  ["-S", "data.train_per_class=0,10"], ["--strategies", "scratch", "-S", "finetune.epochs=2,x"]])
def test_a_cli_mistake_is_one_line_and_exit_code_2(argv):
    result = subprocess.run([sys.executable, "-m", "stages.study", *argv], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr


def test_an_empty_shard_says_so_in_one_line_and_exits_0_before_pulling_or_queueing(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(experiments, "exp_show", lambda: asked.append(1) or [
        {"rev": "workspace", "data": {"params": {"params.yaml": {"data": DEFAULTS}}}}])
    monkeypatch.setattr(study, "dvc", lambda *args, **kwargs: pytest.fail(f"dvc {args} run for an empty shard"))
    monkeypatch.setattr(study, "visible_gpus", lambda: [])
    monkeypatch.setattr(sys, "argv", ["stages.study", "--models", "alexnet,vgg16", "--shard", "5/5"])
    study.main()  # returns: exit code 0
    assert capsys.readouterr().out == "shard 5/5 (--shard): no cells, the grid has only 4: nothing to do\n"
    assert asked == [1] and not (tmp_path / "study").exists()
    monkeypatch.setattr(sys, "argv", ["stages.study", "--shard", "5/5", "-S", "no.such_key=1"])
    with pytest.raises(UserError, match="no such key"):  # an empty shard still checks the command
        study.main()


def test_every_table_and_chart_of_the_report_takes_zero_rows(tmp_path):
    table = results(runs([]))
    assert table.empty and table.attrs["swept"] == []
    assert list(table.columns) == list(results(runs([fake(accuracy=0.5)])).columns)  # those of a table with rows
    report.write([], tmp_path)
    assert pd.read_csv(tmp_path / "results.csv").empty
    assert "| model " in (tmp_path / "results.md").read_text() and (tmp_path / "accuracy.png").exists()
    assert (tmp_path / "cost_accuracy.png").exists()
    # every run failed: rows, but none with a number, for the curve and the gains over scratch
    best = protocols.overrides("best")
    failed = [fake(error="error: out of memory", strategy="finetune",
                   **{**best, **(protocols.SCRATCH["best"] if weights == "none" else {}), "weights": weights,
                      "data.train_per_class": size}) for size in (10, 100) for weights in ("imagenet", "none")]
    gains = gains_over_scratch(results(runs(failed)), "data.train_per_class")
    assert gains.empty and list(gains.columns)[:3] == ["data.train_per_class", "model", "strategy"]
    report.write(failed, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("| failed ") == 4 and "## Gain over training from scratch" in markdown
    assert (tmp_path / "curve.png").exists()


def test_a_report_option_mistake_is_one_line_before_dvc_is_asked(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stages.study.report", "--seeds", "0,x"], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO), "PATH": "/nonexistent"})
    assert result.returncode == 2 and result.stderr == "error: --seeds 0,x: must be integers >= 0, comma-separated, e.g. 0,1,2\n"


PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_a_sweep_multiplies_only_the_strategies_that_read_its_key_and_names_each_cell_once():
    args = study.parse_args(["--strategies", "feature_extraction,finetune,scratch", "--seeds", "0,1", "--protocol",
                             "best", "-S", "data.train_per_class=10,100", "-S", "finetune.unfreeze=range(1,4)",
                             "-S", "weights=/a/w.pth,/b/w.pth"])
    assert args.sweeps == {"data.train_per_class": [10, 100], "finetune.unfreeze": [1, 2, 3],
                           "weights": ["/a/w.pth", "/b/w.pth"]}
    cells = study.grid(["alexnet"], args.strategies, args.seeds, args.overrides, args.sweeps, args.scratch_overrides,
                       PIPELINE)
    by = {name: [c for c in cells if protocols.strategy_of(c) == name] for name in ("feature_extraction", "finetune",
                                                                                     "scratch")}
    # FE: sizes × weights × seeds; fine-tuning: sizes × depths × weights × seeds; scratch: sizes × depths × seeds
    assert [len(by[name]) for name in by] == [2 * 2 * 2, 2 * 3 * 2 * 2, 2 * 3 * 2]
    assert len(by["finetune"]) + len(by["feature_extraction"]) + 12 == len(cells)
    assert all(c["finetune.unfreeze"] == "all" for c in by["feature_extraction"])  # the protocol's, not multiplied
    assert all(c["weights"] == "none" and c["finetune.lr"] == protocols.SCRATCH["best"]["finetune.lr"]
               for c in by["scratch"])
    assert {c["weights"] for c in by["finetune"]} == {"/a/w.pth", "/b/w.pth"}
    workspace = DEFAULTS
    names = [remotes.cell_name(c, study.expected(c, workspace), "abc") for c in cells]
    assert len(set(names)) == len(cells)
    assert names == [remotes.cell_name(c, study.expected(c, workspace), "abc") for c in cells]  # deterministic
    assert {n.split("-")[1] for n in names} == {"fe", "ft", "sc"}
    assert all(protocols.protocol_of(experiments.nest(study.expected(c, workspace))) == "best"
               for c in by["scratch"] if c["finetune.unfreeze"] == "all")


def test_lp_ft_cells_and_a_folder_of_weights_give_each_model_its_cells_and_its_file(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    for name in ("tf_efficientnet_lite0.in1k.pth", "tf_efficientnet_lite2.in1k.pth"):
        (folder / name).write_bytes(b"")
    models = ["timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite2"]
    args = study.parse_args(["--strategies", "feature_extraction,lp_ft", "--seeds", "0,1", "--protocol", "best",
                             "-S", f"weights={folder}", "-S", "data.train_per_class=10,100", "-S", "finetune.lr=0.01,0.1"])
    cells = study.grid(models, args.strategies, args.seeds, args.overrides, args.sweeps, args.scratch_overrides,
                       PIPELINE)
    lp_ft = [c for c in cells if c["strategy"] == "lp_ft"]
    assert len(lp_ft) == 2 * 2 * 2 * 2 and len(cells) - len(lp_ft) == 2 * 2 * 2  # finetune.lr multiplies lp_ft only
    names = [remotes.cell_name(c, study.expected(c, DEFAULTS), "abc") for c in cells]
    assert len(set(names)) == len(cells) and {n.split("-")[-3] for n in names} == {"fe", "lp"}
    for cell in cells:  # each cell's params validate, and its model finds its own weights file in the folder
        checked = param_checks.validate(experiments.nest(study.expected(cell, DEFAULTS)))
        assert checked.model_weights == str(folder / (cell["model"].removeprefix("timm/") + ".in1k.pth"))


def test_scratch_starts_from_weights_unlike_the_files(tmp_path):
    import torch
    import torchvision
    from stages.model import backbones

    written = torchvision.models.resnet18().state_dict()
    path = tmp_path / "w.pth"
    torch.save(written, path)
    cells = study.grid(["resnet18"], ["finetune", "scratch"], [0], {"weights": str(path)}, pipeline=PIPELINE)
    assert [c["weights"] for c in cells] == [str(path), "none"]
    from_file, scratch = (backbones.build("resnet18", c["weights"], 10).body.state_dict() for c in cells)
    assert torch.equal(from_file["conv1.weight"], written["conv1.weight"])
    assert not torch.equal(scratch["conv1.weight"], written["conv1.weight"])


def test_the_curve_is_drawn_from_records_with_a_band_per_strategy_and_the_gain_over_scratch(tmp_path):
    best = protocols.overrides("best")
    records = [fake(accuracy=accuracy + 0.01 * seed, seed=seed, strategy=strategy,
                    **{**best, **(protocols.SCRATCH["best"] if weights == "none" else {}), "weights": weights,
                       "data.train_per_class": size})
               for size, accuracies in ((10, (0.5, 0.6, 0.2)), (100, (0.7, 0.8, 0.4)), (None, (0.8, 0.9, 0.8)))
               for (strategy, weights), accuracy in zip((("feature_extraction", "imagenet"), ("finetune", "imagenet"),
                                                        ("finetune", "none")), accuracies)
               for seed in (0, 1)]
    table = results(runs(records))
    assert sorted(set(table["strategy"])) == ["feature_extraction", "finetune", "scratch"]
    assert set(table["protocol"]) == {"best"} and table.attrs["swept"] == ["data.train_per_class"]
    fig = charts.transfer_curve(table, "data.train_per_class")
    lines = fig.axes[0].get_lines()
    assert len(lines) == 3 and all(len(line.get_xdata()) == 3 for line in lines)
    assert fig.axes[0].get_xscale() == "log" and [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "10", "100", "all", "1000", "5000"]
    assert len(fig.axes[0].collections) == 3 + len(charts.ANCHORS)  # a band per line, a mark per anchor
    report.write(records, tmp_path)
    assert (tmp_path / "curve.png").stat().st_size > 20_000
    markdown = (tmp_path / "results.md").read_text()
    assert "## Gain over training from scratch, per data.train_per_class" in markdown
    gains = table_rows(markdown, "| 10 ")
    assert any("fine-tuning" in r and "+40.0" in r for r in gains) and any("scratch" in r and "+0.0" in r for r in gains)
    report.write(records[:2], tmp_path)  # nothing swept: no curve, and none left from before
    assert not (tmp_path / "curve.png").exists()


def table_rows(markdown: str, start: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith(start)]


def test_gpus_are_grouped_for_a_fine_tune_with_several_processes(monkeypatch):
    monkeypatch.setattr(study, "visible_gpus", lambda: ["0", "1", "2", "3", "4"])
    assert study.gpu_groups(None, 1) == ["0", "1", "2", "3", "4"]
    assert study.gpu_groups(None, 2) == ["0,1", "2,3"]
    assert study.gpu_groups(["0+1", "2+3"], 2) == ["0,1", "2,3"] and study.gpu_groups(["4", "2"], 1) == ["4", "2"]
    uuid, mig = "GPU-5c89a2b1-0d6e-4f1a-9b3c-2e7d8f9a0b1c", "MIG-GPU-5c89a2b1-0d6e-4f1a-9b3c-2e7d8f9a0b1c/7/0"
    assert study.gpu_groups([uuid, mig], 1) == [uuid, mig]  # left to CUDA: the visible list names indices
    for gpus in (["0", "1"], ["0+1", "1+2"], ["0+"], ["abc"], ["5"]):
        with pytest.raises(UserError):
            study.gpu_groups(gpus, 2)


def test_a_worker_starts_per_gpu_once_the_ones_before_it_run_and_a_stalled_queue_stops(monkeypatch):
    polls = iter([({"a": "queued", "b": "queued", "c": "queued"}, []),
                  ({"a": "queued", "b": "queued", "c": "queued"}, []),
                  ({"a": "running", "b": "queued", "c": "queued"}, [None]),
                  ({"a": "running", "b": "running", "c": "queued"}, [None, None]),
                  ({"a": "failed", "b": "running", "c": "running"}, [None, None]),
                  ({"a": "failed", "b": "success", "c": "success"}, [])])
    seen, started = [], []
    monkeypatch.setattr(queue, "experiment_states", lambda names: seen.append(1) or next(polls))
    monkeypatch.setattr(queue, "start_worker", lambda gpu, number: started.append((gpu, number, len(seen))))
    monkeypatch.setattr(queue, "POLL_SECONDS", 0)
    queue.run_queue(["a", "b", "c"], ["0", "1"])
    assert started == [("0", 1, 1), ("1", 2, 3)]  # the second once the first runs an experiment

    dead = 2 ** 22 + 1  # above Linux's largest pid
    monkeypatch.setattr(queue, "experiment_states", lambda names: ({"a": "queued", "b": "running"}, [dead]))
    with pytest.raises(SystemExit, match="the DVC queue stopped: 2 experiment"):
        queue.run_queue(["a", "b"], [])
    polls = iter([({"a": "queued"}, [os.getpid()])] * queue.STALL_POLLS + [({"a": "success"}, [])])
    monkeypatch.setattr(queue, "experiment_states", lambda names: next(polls))
    queue.run_queue(["a"], [])  # waits as long as another's experiment ahead of ours runs


@pytest.mark.parametrize("held", [{"a": "running", "b": "success", "c": "queued"},  # b finished meanwhile
                                  {"a": "running", "b": "running", "c": "running"}])  # c started meanwhile
def test_ctrl_c_reads_the_states_again_when_dvc_refuses_a_name_whose_state_changed(monkeypatch, capsys, held):
    held = dict(held)  # what DVC holds by the time it is told; the study first read a and b running, c queued
    read = {"a": "running", "b": "running", "c": "queued"}
    told = []

    def dvc(*args):
        told.append(args)
        command, names = args[1], [arg for arg in args[2:] if not arg.startswith("-")]
        wanted, after = {"remove": ("queued", None), "kill": ("running", "failed"), "stop": (None, None)}[command]
        if any(held[name] != wanted for name in names):
            raise experiments.DvcFailed(f"error: `dvc {' '.join(args)}` failed with exit code 255: not a valid name")
        held.update(dict.fromkeys(names, after))

    reads = iter([read])
    monkeypatch.setattr(queue, "experiment_states", lambda names: (next(reads, held), []))
    monkeypatch.setattr(queue, "dvc", dvc)
    with pytest.raises(SystemExit) as stopped:
        queue.stop(["a", "b", "c"])
    assert stopped.value.code == 130 and told[-1] == ("queue", "stop")
    assert held["a"] == "failed" and held["c"] in (None, "failed")  # the queued c removed, or killed once started
    assert not {"queued", "running"} & set(held.values())
    killed = sum(state == "failed" for state in held.values())
    assert f"{killed} running experiment(s) killed and {int(held['c'] is None)} queued" in capsys.readouterr().err


def test_a_hung_dvc_exp_show_is_asked_again_then_stops_with_one_line(monkeypatch):
    answers = ["[]", None, None]  # popped from the end: two hangs, then an answer

    def dvc(*args, timeout=None):
        answer = answers.pop()
        if answer is None:
            raise subprocess.TimeoutExpired(["dvc", *args], timeout)
        return answer

    monkeypatch.setattr(experiments, "dvc", dvc)
    assert experiments.exp_show() == [] and not answers
    answers.extend([None] * 3)
    with pytest.raises(SystemExit, match=r"^error: `dvc exp show --json` did not finish in 60 s, 3 times over$"):
        experiments.exp_show()


def test_a_failed_read_of_dvcs_state_is_asked_again_and_only_a_sustained_failure_stops(monkeypatch):
    failure = experiments.DvcFailed("error: `dvc exp show --json` failed with exit code 255: failed to show experiments")
    answers = ["[]", failure]  # popped from the end: one failure, then an answer
    waits = []

    def dvc(*args, timeout=None):
        answer = answers.pop()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(experiments, "dvc", dvc)
    monkeypatch.setattr(experiments.time, "sleep", waits.append)
    assert experiments.exp_show() == [] and waits == [1.0]
    answers.extend([failure] * 20)
    with pytest.raises(SystemExit, match=r"^error: `dvc exp show --json` failed .* \(still, after 60 s of asking again\)$"):
        experiments.exp_show()
    assert waits[1:] == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]


def test_a_queue_message_half_written_by_a_killed_process_is_removed_and_dvc_asked_again(dvc_project, capsys):
    broker = dvc_project / experiments.QUEUE_MESSAGES
    (broker / "in").mkdir(parents=True)
    (broker / "processed").mkdir()
    cut = broker / "in" / "1_a.reply.celery.pidbox.msg"
    cut.write_text('{"body": "eyJ')  # a SIGKILL mid-write: DVC fails every read with "unexpected error"
    whole = broker / "processed" / "2_b.reply.celery.pidbox.msg"
    whole.write_text(json.dumps({"body": "e30=", "content-encoding": "utf-8", "content-type": "application/json",
                                 "headers": {}, "properties": {"delivery_tag": "b", "body_encoding": "base64",
                                                               "delivery_info": {"routing_key": "x"}}}))
    assert run("dvc", "exp", "show", "--json", check=False).returncode == 255
    assert experiments.exp_show()[0]["rev"] == "workspace"
    assert not cut.exists() and whole.exists()
    assert "removed 1 DVC queue message(s)" in capsys.readouterr().err


def shown_experiments() -> list[dict]:
    return json.loads(run("dvc", "exp", "show", "--json").stdout)[1]["experiments"] or []


def test_the_study_runs_the_grid_as_queued_dvc_experiments_one_per_gpu(dvc_project):
    study_run = [sys.executable, "-m", "stages.study", "--models", "alexnet,alexnot", "--gpus", "0,1",
                 "-S", "train_heads.lr=2e-3", *TINY]
    result = run(*study_run, check=False)
    assert result.returncode == 1 and "2 experiment(s) failed" in result.stderr, result.stderr
    table = pd.read_csv(dvc_project / "study/results.csv")
    assert len(table) == 4 and table["accuracy_mean"].notna().sum() == 2
    assert table[table["model"] == "alexnot"]["problems"].str.contains("not a torchvision classification model").all()
    assert (dvc_project / "study/accuracy.png").stat().st_size > 10_000
    shown = shown_experiments()
    succeeded = [e for e in shown if not e["revs"][0]["error"]]
    assert len(succeeded) == 2 and all(e["executor"] is None for e in succeeded)  # the queue's list cleared, not them
    assert all(e["executor"]["state"] == "failed" for e in shown if e["revs"][0]["error"])
    for e in succeeded:
        data = e["revs"][0]["data"]
        lr = data["params"]["params.yaml"]["data"]["train_heads"]["lr"]
        assert lr == 0.002 and isinstance(lr, float)
        assert data["metrics"]["metrics/metrics.json"]["data"]["run"]["cuda_visible_devices"] in ("0", "1")

    again = run(*study_run[:4], "alexnet", *study_run[5:])
    assert "2 of 2 cells; 2 already done; queueing 0" in again.stdout
    assert len(pd.read_csv(dvc_project / "study/results.csv")) == 2
    run(sys.executable, "-m", "stages.study.report")
    assert len(pd.read_csv(dvc_project / "study/results.csv")) == 4

    unknown = run(sys.executable, "-m", "stages.study", "-S", "train_heads.learning_rate=0.1", check=False)
    assert unknown.returncode == 2 and unknown.stderr == "error: -S train_heads.learning_rate: no such key in params.yaml\n"


def test_a_slurm_array_with_more_tasks_than_cells_ends_its_extra_tasks_with_exit_0(dvc_project):
    extra_task = {**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    result = subprocess.run([sys.executable, "-m", "stages.study", "--models", "alexnet", *TINY], env=extra_task,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "shard 3/3 (SLURM_ARRAY_TASK_ID=3 of 3): no cells, the grid has only 2: nothing to do\n"
    assert not (dvc_project / "study").exists() and not shown_experiments()


FAKE_STAGE = '''import json, os, sys, time
import yaml
params = yaml.safe_load(open("params.yaml"))
started = time.time()
if params["model"] == "broken":
    sys.exit("error: broken on purpose")
time.sleep(4)
os.makedirs("metrics", exist_ok=True)
json.dump({"test": {"accuracy": 0.5}, "total_time_s": 4.0,
           "run": {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "started": started,
                   "ended": time.time()}}, open("metrics/metrics.json", "w"))
'''


def with_fake_stage(project: Path, code: str) -> None:
    """The project's pipeline replaced by one stage that runs `code`, committed."""
    (project / "fake_stage.py").write_text(code)
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fake": {
        "cmd": "python fake_stage.py", "deps": ["fake_stage.py"], "params": ["model", "strategy", "seed"],
        "metrics": [{"metrics/metrics.json": {"cache": False}}]}}}))
    run("git", "add", "-A")
    run("git", "commit", "-qm", "a stage that sleeps")


def test_each_gpu_runs_one_experiment_at_a_time_two_gpus_two_at_once_under_a_protocol(dvc_project):
    with_fake_stage(dvc_project, FAKE_STAGE)
    result = run(sys.executable, "-m", "stages.study", "--models", "a,broken,b", "--strategies", "finetune",
                 "--seeds", "0,1", "--gpus", "0,1", "--protocol", "readme", "-S", "train_heads.epochs=2", check=False)
    assert result.returncode == 1 and "2 experiment(s) failed" in result.stderr, result.stderr
    assert "broken on purpose" in Path("study/results.md").read_text()
    data = [e["revs"][0]["data"] for e in shown_experiments() if not e["revs"][0]["error"]]
    for ran in (d["params"]["params.yaml"]["data"] for d in data):
        assert protocols.differences(ran, "readme") == ["train_heads.epochs"]  # -S wins over the protocol
        assert ran["train_heads"]["epochs"] == 2
    timings = [d["metrics"]["metrics/metrics.json"]["data"]["run"] for d in data]
    assert len(timings) == 4 and {r["cuda_visible_devices"] for r in timings} == {"0", "1"}
    overlap = [(a, b) for i, a in enumerate(timings) for b in timings[i + 1:]
               if a["started"] < b["ended"] and b["started"] < a["ended"]]
    assert overlap and all(a["cuda_visible_devices"] != b["cuda_visible_devices"] for a, b in overlap)


def legend_beside_the_axes(fig) -> list[str]:
    """The legend's labels, after checking that it lies right of the axes, where it covers no data."""
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
    return [text.get_text() for text in legend.get_texts()]


def test_the_cost_figure_has_a_labelled_point_per_row_and_a_legend_of_what_is_drawn(tmp_path):
    records = [fake(accuracy=0.7, **{**protocols.overrides(name), "model": "timm/tf_efficientnet_lite0"},
                    strategy=strategy) for name in ("notebook", "readme", "best")
               for strategy in ("feature_extraction", "finetune")]
    table = results(runs(records))
    fig = charts.cost_accuracy(table)
    labels = [text.get_text() for text in fig.axes[0].texts]
    assert len(labels) == 6 and "tf_efficientnet_lite0, fine-tuning, best" in labels
    assert sorted(legend_beside_the_axes(fig)) == sorted(["notebook", "readme", "best", "feature extraction",
                                                          "fine-tuning"])
    assert legend_beside_the_axes(charts.study_bars(table)) == ["this run"]  # nothing published compares
    report.write(records, tmp_path)
    assert (tmp_path / "cost_accuracy.png").stat().st_size > 10_000


def test_ctrl_c_stops_what_the_study_started_and_a_rerun_finishes_the_grid_without_redoing_cells(dvc_project):
    started = dvc_project.parent / "started.log"
    with_fake_stage(dvc_project, FAKE_STAGE.replace(
        "started = time.time()", f"started = time.time()\nopen({str(started)!r}, 'a').write(params['model'] + '\\n')"))
    command = [sys.executable, "-m", "stages.study", "--models", "a,b,c", "--strategies", "finetune"]
    # SIGINT at its default, as in a terminal (a shell's background job would have it ignored)
    study_process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and (not started.exists() or len(started.read_text().split()) < 2):
        time.sleep(1)  # one cell done, the second running
    os.killpg(study_process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, err = study_process.communicate(timeout=120)
    assert study_process.returncode == 130, err
    assert "run the same command again to resume" in err.strip().splitlines()[-1]
    time.sleep(5)
    assert not processes_in(dvc_project)
    done_before = [e for e in shown_experiments() if not e["revs"][0]["error"] and e.get("executor") is None
                   or (e.get("executor") or {}).get("state") == "success"]
    ran_before = started.read_text().split()

    again = run(*command)
    assert f"3 of 3 cells; {len(done_before)} already done" in again.stdout and len(done_before) >= 1
    assert len(pd.read_csv(dvc_project / "study/results.csv")) == 3
    ran_after = started.read_text().split()[len(ran_before):]
    finished = {e["revs"][0]["data"]["params"]["params.yaml"]["data"]["model"] for e in done_before}
    assert not finished & set(ran_after) and set(ran_after) | finished == {"a", "b", "c"}
