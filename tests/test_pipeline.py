"""The real DVC pipeline on the synthetic source, in a scratch git repo."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from stages import cache_features
from stages.pipeline import outputs
from stages.pipeline.errors import UserError
from tests.conftest import (CHANCE, FAST, LEARNS, full_model_accuracy, kill_session, processes_in, ran_stages,
                            restored_stages, run, set_params, stage, write_malicious)

def metrics(project, path: str = "metrics/metrics.json") -> dict:
    """One of the pipeline's metrics files: evaluate's by default."""
    return json.loads((project / path).read_text())


def output_hashes(project) -> dict:
    """dvc.lock's hashes of data and model outputs (metrics and DVCLive's files carry timings)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for s in lock["stages"].values() for out in s.get("outs", [])
            if not out["path"].startswith(("metrics/", "live/", "plots/"))}


def test_dvc_exp_run_prepare_data_on_the_synthetic_source(dvc_project):
    result = run("dvc", "exp", "run", "prepare-data", "-S", "data.source=synthetic", "-S", "data.val_fraction=0.1")
    assert ran_stages(result.stdout) == ["check-inputs", "prepare-data"]
    manifest = json.loads((dvc_project / "data/prepared/manifest.json").read_text())
    assert [manifest["splits"][s]["count"] for s in ("train", "val", "test")] == [540, 60, 300]


def test_a_bad_param_stops_dvc_before_any_output_is_removed(dvc_project):
    run("dvc", "exp", "run", "prepare-data", "-S", "data.source=synthetic")
    for bad in ("data.val_fraction=1.5", "model=alexnot", "data.image_size=32"):
        result = run("dvc", "exp", "run", "prepare-data", "-S", bad, check=False)
        assert result.returncode != 0 and "error: params.yaml: " in result.stderr + result.stdout
        assert "Traceback" not in result.stderr + result.stdout
        assert (dvc_project / "data/prepared/train_images.npy").exists()


def test_feature_extraction_then_finetune_as_dvc_experiments(dvc_project):
    set_params(dvc_project / "params.yaml", LEARNS)
    run("git", "commit", "-qam", "fast params")
    first = run("dvc", "repro")
    assert ran_stages(first.stdout) == ["check-inputs", "prepare-data", "cache-features", "train-heads",
                                        "finetune", "evaluate"]
    fe = metrics(dvc_project)
    assert fe["test"]["accuracy"] > 2 * CHANCE
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(dvc_project)
        assert fe["test"]["accuracy"] == pytest.approx(full_model_accuracy(), abs=1e-6)  # the cached path's, on images
    fe_features = metrics(dvc_project, "metrics/features.json")
    fe_trained = metrics(dvc_project, "live/train_heads/metrics.json")
    assert fe_features["time_s"] > 0 and fe["evaluate_time_s"] > 0
    assert fe["total_time_s"] == round(fe_features["time_s"] + fe_trained["time_s"] + fe["evaluate_time_s"], 2)
    assert (dvc_project / "plots/confusion.png").stat().st_size > 10_000
    assert ran_stages(run("dvc", "repro").stdout) == ["check-inputs"]  # it hashes the inputs; nothing changed

    other_seed = run("dvc", "exp", "run", "-S", "seed=1")  # same data, same feature cache
    assert not {"prepare-data", "cache-features"} & set(ran_stages(other_seed.stdout))
    assert "train-heads" in ran_stages(other_seed.stdout)
    changed = run("dvc", "exp", "run", "-S", "seed=0", "-S", "train_heads.lr=0.0005")
    # finetune reads the probe for lp_ft: a new probe reruns it, which writes the same skipped note
    assert ran_stages(changed.stdout) == ["check-inputs", "train-heads", "finetune", "evaluate"]
    smaller = run("dvc", "exp", "run", "-S", "data.train_per_class=20")  # a second size: the data and features serve it
    assert ran_stages(smaller.stdout) == ["check-inputs", "train-heads", "finetune", "evaluate"]
    assert metrics(dvc_project, "live/train_heads/metrics.json")["train_images"] == 20 * 10

    finetune = run("dvc", "exp", "run", "-S", "strategy=finetune", "-S", "train_heads.lr=0.0005",
                   "-S", "data.train_per_class=null")
    assert "prepare-data" not in ran_stages(finetune.stdout)
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    features = next(o for o in lock["stages"]["cache-features"]["outs"] if o["path"] == "data/features")
    assert features["nfiles"] == 1 and features["size"] < 1000  # only the "skipped" note
    ft = metrics(dvc_project)
    assert ft["test"]["accuracy"] > 2 * CHANCE
    assert metrics(dvc_project, "metrics/features.json")["time_s"] == 0
    assert metrics(dvc_project, "live/finetune/metrics.json")["trainable_params"] > fe_trained["trainable_params"]
    assert not list((dvc_project / ".checkpoints").rglob("*.pt"))  # deleted once the stage completed

    back = run("dvc", "exp", "run", "-S", "strategy=feature_extraction", "-S", "train_heads.lr=0.0005")
    assert {"cache-features", "train-heads", "evaluate"} <= set(restored_stages(back.stdout))
    assert "cache-features" not in ran_stages(back.stdout) and "train-heads" not in ran_stages(back.stdout)

    again = run("dvc", "exp", "run", "-S", "strategy=finetune")  # the workspace holds feature extraction's outputs
    assert "finetune" in restored_stages(again.stdout) and "finetune" not in ran_stages(again.stdout)
    assert metrics(dvc_project)["test"] == ft["test"]

    shown = json.loads(run("dvc", "exp", "show", "--json").stdout)
    revs = [rev for baseline in shown for e in baseline["experiments"] or [] for rev in e["revs"]]
    assert len(revs) == 6
    live = [rev["data"]["metrics"]["live/finetune/metrics.json"]["data"] for rev in revs
            if rev["data"]["params"]["params.yaml"]["data"]["strategy"] == "finetune"]  # DVCLive's record
    assert len(live) == 2 and all({"train", "val", "best_epoch", "time_s"} <= set(r) for r in live)


def test_identical_runs_give_identical_outputs_a_kill_9_recovers_and_a_code_edit_reruns_its_stages_only(dvc_project):
    set_params(dvc_project / "params.yaml", {**FAST, "train_heads.epochs": 2, "finetune.epochs": 1})
    features = dvc_project / "data/features"
    run("git", "commit", "-qam", "fast params")
    run("dvc", "repro")
    first, first_metrics = output_hashes(dvc_project), metrics(dvc_project)
    trained = metrics(dvc_project, "live/train_heads/metrics.json")
    assert trained["trainable_params"] == 40_970 and trained["step"] == 1  # DVCLive counts epochs from 0

    # kill -9 the whole `dvc repro -f` once cache-features has emptied its folder, then run it again
    process = subprocess.Popen(["dvc", "repro", "-f"], stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while (features / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_session(process)
    assert process.returncode == -signal.SIGKILL and not (features / "manifest.json").exists()
    run("dvc", "repro")
    assert output_hashes(dvc_project) == first  # byte-identical data and models
    assert metrics(dvc_project)["test"]["accuracy"] == first_metrics["test"]["accuracy"]

    stages = run("dvc", "stage", "list").stdout.strip().splitlines()
    assert len(stages) == 6 and all(len(line.split(None, 1)) == 2 for line in stages)  # each has a desc
    shown = run("dvc", "plots", "show", "-o", "dvc_plots")
    assert "failed to load" not in shown.stdout + shown.stderr
    html = (dvc_project / "dvc_plots/index.html").read_text()
    for png in ("confusion.png", "predictions.png"):
        assert len(re.findall(rf'<img[^>]*{png}', html)) == 1, png

    # an edit to code that only one stage imports changes only that stage's deps
    edit_function(dvc_project / "stages/training/finetuning.py", "def set_trainable(")
    assert changed_stages() == {"check-inputs", "finetune"}  # check-inputs: always_changed
    assert ran_stages(run("dvc", "repro").stdout) == ["check-inputs", "finetune"]  # the same skipped note: no evaluate
    edit_function(dvc_project / "stages/data/sources.py", "def as_rgb(")
    assert changed_stages() == {"check-inputs", "prepare-data"}


def edit_function(path, start: str) -> None:
    """Adds a statement that does nothing to the function that starts with `start`."""
    text = path.read_text()
    body = text.index("\n", text.index('"""', text.index('"""', text.index(start)) + 3)) + 1
    path.write_text(text[:body] + "    pass\n" + text[body:])


def changed_stages() -> set[str]:
    return set(json.loads(run("dvc", "status", "--json").stdout))


def test_an_interrupted_finetune_resumes_to_the_same_result(project):
    set_params(project / "params.yaml", {**LEARNS, "strategy": "finetune", "finetune.epochs": 3,
                                             "finetune.checkpoint_interval_s": 0})
    for name in ("check_inputs", "prepare_data", "cache_features", "finetune", "evaluate"):
        stage(name)
    uninterrupted = metrics(project)["test"]
    assert not list((project / ".checkpoints").rglob("*.pt"))

    process = subprocess.Popen([sys.executable, "-m", "stages.finetune"], stderr=subprocess.DEVNULL)
    while not list((project / ".checkpoints").rglob("last.pt")) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (project / "models/finetune/model.pt").exists()
    assert re.search(r"resuming from \.checkpoints/finetune/\w+/last.pt after epoch", stage("finetune").stdout)
    stage("evaluate")
    assert metrics(project)["test"] == uninterrupted


def test_cached_features_are_identical_across_runs_on_the_cpu(project):
    set_params(project / "params.yaml", {**FAST, "features.flip": True})
    stage("check_inputs")
    stage("prepare_data")
    stage("cache_features")
    first = (project / "data/features/train_flip.npy").read_bytes()
    stage("cache_features")
    assert (project / "data/features/train_flip.npy").read_bytes() == first


def test_a_disk_too_small_for_the_feature_cache_is_one_line(project, monkeypatch):
    set_params(project / "params.yaml", FAST)
    stage("check_inputs")
    stage("prepare_data")
    monkeypatch.setattr(cache_features.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10**6}))
    with pytest.raises(UserError, match=r"the feature cache needs 0.02 GB in data/features/, but only 0.00 GB is free"):
        cache_features.main()
    assert not (project / "data/features/train.npy").exists()


@pytest.mark.parametrize("strategy", ["feature_extraction", "finetune"])
def test_a_trained_model_that_could_run_code_is_refused(project, strategy):
    set_params(project / "params.yaml", {**FAST, "strategy": strategy})
    stage("prepare_data")
    model_file, live_dir = outputs.TRAINED[strategy], outputs.LIVE[strategy]
    for present in (live_dir / "metrics.json", outputs.FEATURE_METRICS, outputs.FEATURES / "manifest.json",
                    outputs.FEATURES_MADE_FROM):
        outputs.write_json(present, {})  # the other inputs that evaluate checks for first
    model_file.parent.mkdir(parents=True)
    write_malicious(model_file, project / "code-ran")
    result = stage("evaluate", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is not a file of tensors and plain values, so it is not loaded" in result.stderr
    assert not (project / "code-ran").exists()


def test_editing_adding_or_removing_an_image_in_a_local_folder_reruns_prepare_data(dvc_project):
    from PIL import Image
    for split in ("train", "test"):
        for label, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            (dvc_project / "images" / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), colour).save(dvc_project / "images" / split / label / f"{i}.png")
    settings = ["-S", "data.source=imagefolder", "-S", f"data.root={dvc_project / 'images'}"]
    first = run("dvc", "exp", "run", "prepare-data", *settings)
    assert "prepare-data" in ran_stages(first.stdout)
    assert outputs.read_json(dvc_project / "data/prepared/manifest.json")["stored_size"]["side"] == 16
    assert "prepare-data" not in ran_stages(run("dvc", "exp", "run", "prepare-data", *settings).stdout)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(dvc_project / "images/train/cat/0.png")
    assert "prepare-data" in ran_stages(run("dvc", "exp", "run", "prepare-data", *settings).stdout)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(dvc_project / "images/train/cat/3.png")  # added
    assert "prepare-data" in ran_stages(run("dvc", "exp", "run", "prepare-data", *settings).stdout)
    (dvc_project / "images/train/dog/2.png").unlink()  # removed
    assert "prepare-data" in ran_stages(run("dvc", "exp", "run", "prepare-data", *settings).stdout)
    assert outputs.read_json(dvc_project / "data/prepared/manifest.json")["splits"]["train"]["per_class"] == {
        "cat": 4, "dog": 2}


def test_finetune_under_torchrun_with_two_processes_resumes_after_kill_9(dvc_project):
    set_params(dvc_project / "params.yaml", {**LEARNS, "strategy": "finetune", "finetune.processes": 2,
                                                 "finetune.checkpoint_interval_s": 0})
    run("git", "commit", "-qam", "two processes")
    process = subprocess.Popen(["dvc", "repro"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((dvc_project / ".checkpoints").rglob("last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_session(process)  # dvc and torchrun; the workers die with it
    deadline = time.monotonic() + 10
    while processes_in(dvc_project, b"stages.finetune") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_in(dvc_project, b"stages.finetune")  # none left training beside the rerun
    resumed = run("dvc", "repro")
    assert "torchrun --standalone --nproc-per-node=2 -m stages.finetune" in resumed.stdout
    assert re.search(r"resuming from \.checkpoints/finetune/\w+/last.pt after epoch [12]", resumed.stdout + resumed.stderr)
    trained = metrics(dvc_project, "live/finetune/metrics.json")
    assert trained["world_size"] == 2 and trained["step"] == 2  # 3 epochs, counted from 0
    assert metrics(dvc_project)["test"]["accuracy"] > 2 * CHANCE


def test_a_stage_run_by_hand_before_its_inputs_exist_names_the_missing_file_and_its_command(project):
    def refused(name: str, strategy: str = "feature_extraction") -> str:
        set_params(project / "params.yaml", {**FAST, "strategy": strategy})
        result = stage(name, check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        return result.stderr

    def skipped(name: str, strategy: str) -> str:
        set_params(project / "params.yaml", {**FAST, "strategy": strategy})
        result = stage(name)
        assert result.stdout.count("\n") == 1 and not result.stderr
        return result.stdout

    for name in ("cache_features", "train_heads"):
        assert refused(name).startswith("error: data/inputs/probe.json is missing: `dvc repro check-inputs`")
    assert refused("evaluate").startswith("error: data/prepared/manifest.json is missing: `dvc repro prepare-data`")
    assert "data/prepared/manifest.json is missing" in refused("finetune", "finetune")
    assert skipped("finetune", "feature_extraction").startswith("skipped: strategy is feature_extraction")
    assert "inputs checked" in skipped("check_inputs", "finetune")
    for name in ("cache_features", "train_heads"):  # reading nothing they do not need
        assert skipped(name, "finetune").startswith("skipped: the strategy trains no probe")
    assert "written for another strategy" in refused("cache_features")  # probe.json is finetune's
    stage("check_inputs")
    for name in ("cache_features", "train_heads"):
        assert refused(name).startswith("error: data/prepared/manifest.json is missing: `dvc repro prepare-data`")
    stage("prepare_data")
    assert "data/features/manifest.json is missing: `dvc repro cache-features`" in refused("train_heads")
    assert "models/finetune/model.pt is missing: `dvc repro finetune`" in refused("evaluate", "finetune")


def test_a_killed_finetune_resumes_only_for_the_same_weights_and_code(dvc_project):
    """Killed after its first checkpoint, then its weights file replaced in place (same path), the rerun
    starts afresh and ends where a clean run on the new file ends; the same after a code edit."""
    import torch
    from torchvision.models import resnet18

    weights = dvc_project / "weights.pth"

    def write_weights(seed: int) -> None:
        torch.manual_seed(seed)
        torch.save(resnet18().state_dict(), weights)

    def killed_after_a_checkpoint() -> None:
        process = subprocess.Popen(["dvc", "repro"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        while not list((dvc_project / ".checkpoints").rglob("last.pt")) and process.poll() is None:
            time.sleep(0.05)
        kill_session(process)

    set_params(dvc_project / "params.yaml", {**LEARNS, "strategy": "finetune", "model": "resnet18",
                                             "weights": str(weights), "data.image_size": 32, "finetune.epochs": 3,
                                             "finetune.checkpoint_interval_s": 0})
    write_weights(1)
    run("git", "commit", "-qam", "a weights file")
    killed_after_a_checkpoint()
    write_weights(2)  # the same path, other content
    rerun = run("dvc", "repro")
    assert "no checkpoint for these inputs" in rerun.stdout and "resuming" not in rerun.stdout
    on_new_weights = metrics(dvc_project)["test"]
    shutil.rmtree(dvc_project / ".checkpoints", ignore_errors=True)
    assert "resuming" not in run("dvc", "repro", "-f", "--no-run-cache", "finetune", "evaluate").stdout
    assert metrics(dvc_project)["test"] == on_new_weights  # a clean run on the new file

    write_weights(1)
    killed_after_a_checkpoint()
    loop_module = dvc_project / "stages/training/loop.py"
    loop_module.write_text(loop_module.read_text() + "\n# an edit\n")
    rerun = run("dvc", "repro")
    assert "no checkpoint for these inputs" in rerun.stdout and "resuming" not in rerun.stdout


def test_lp_ft_reuses_the_probe_of_feature_extraction_and_starts_from_it(dvc_project):
    """lp_ft beside feature extraction runs no second cache-features or train-heads; finetune starts
    from the probe (its starting point scores on val what the probe scored); a finetune param reruns
    only finetune and evaluate."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    torch.save(resnet18().state_dict(), dvc_project / "weights.pth")
    set_params(dvc_project / "params.yaml", {**LEARNS, "model": "resnet18", "weights": str(dvc_project / "weights.pth"),
                                             "data.image_size": 32, "data.train_per_class": 20,
                                             "train_heads.solver": "lbfgs", "train_heads.trainable": "last",
                                             "finetune.epochs": 2, "finetune.unfreeze": 1})
    run("git", "commit", "-qam", "a probe")
    assert "train-heads" in ran_stages(run("dvc", "exp", "run").stdout)
    probe_val = metrics(dvc_project, "live/train_heads/metrics.json")["best_val_accuracy"]
    lp_ft = run("dvc", "exp", "run", "-S", "strategy=lp_ft")
    assert ran_stages(lp_ft.stdout) == ["check-inputs", "finetune", "evaluate"]
    start_val = float(re.search(r"starting point: val accuracy ([\d.]+)", lp_ft.stdout + lp_ft.stderr).group(1))
    assert abs(start_val - probe_val) <= 0.02, (start_val, probe_val)  # fp16 features against the images
    evaluated = metrics(dvc_project)
    parts = [metrics(dvc_project, f)["time_s"] for f in ("metrics/features.json", "live/train_heads/metrics.json",
                                                          "live/finetune/metrics.json")]
    assert evaluated["total_time_s"] == pytest.approx(sum(parts) + evaluated["evaluate_time_s"], abs=0.02)
    again = run("dvc", "exp", "run", "-S", "strategy=lp_ft", "-S", "finetune.lr=0.002")
    assert ran_stages(again.stdout) == ["check-inputs", "finetune", "evaluate"]
