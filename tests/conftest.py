"""Shared fixtures and helpers: a scratch copy of the project, params edits, the ../shared check.

Two tiers: a test that runs DVC (the dvc_project fixture) or the stages as processes is marked
`dvc`; `python -m pytest -m "not dvc"` runs the library's tests alone, in about a minute.
"""
import inspect
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from stages import check_inputs
from stages.pipeline import param_checks, params
from stages.study.experiments import nest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg.tar.gz"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.pth"

# Small enough that every stage runs in seconds on a 2-core CPU; otherwise the default (notebook) protocol.
FAST = {"data.source": "synthetic", "model": "alexnet", "weights": "none", "data.image_size": 64,
        "finetune.epochs": 2}
# With random weights, the features are tiny: SGD at lr 1e-3 barely moves in a few epochs, and neither
# does the last Linear alone on random FC6 and FC7, while Adam on the whole classifier
# (scale-free) learns. A validation split picks the best epoch.
LEARNS = {**FAST, "data.val_fraction": 0.1, "train_heads.optimizer": "adam", "train_heads.epochs": 6,
          "train_heads.trainable": "classifier",
          "finetune.optimizer": "adam", "finetune.unfreeze": 2, "finetune.backbone_lr": 1e-4,
          "finetune.batch_size": 64, "finetune.epochs": 3}


# The study's smallest grid cell: synthetic data, random weights, a few seconds a stage
TINY = ["-S", "data.source=synthetic", "-S", "weights=none", "-S", "data.image_size=64", "-S", "train_heads.epochs=2",
        "-S", "finetune.epochs=1", "-S", "data.synthetic.train_per_class=20", "-S", "data.synthetic.test_per_class=10"]
CHANCE = 0.1  # accuracy of a guess among the synthetic source's 10 classes


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def restored_stages(output: str) -> list[str]:
    return re.findall(r"Stage '([\w-]+)' is cached - skipping run", output)


STARTS_A_STAGE = re.compile(r'\bstage\(|"-m", f?"stages\.')  # a stage, or the study, run as a process
CURRENT_TEST = {}


def pytest_collection_modifyitems(items):
    """The slow tier, marker dvc, by itself: every test that runs DVC (the dvc_project fixture) or
    starts a stage as a process. run() refuses a stage's process in a test without it."""
    for item in items:
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if "dvc_project" in getattr(item, "fixturenames", ()) or STARTS_A_STAGE.search(source):
            item.add_marker(pytest.mark.dvc)


@pytest.fixture(autouse=True)
def current_test(request):
    CURRENT_TEST["node"] = request.node
    yield


def set_params(path: Path, changes: dict) -> None:
    """Writes dotted-key changes into a params.yaml and, if they pass param_checks, records them as
    check-inputs does (its model checks aside), so that the stages that a test runs read them."""
    raw = nest(changes, into=yaml.safe_load(path.read_text()))
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    record_if_valid(path)


def record_if_valid(path: Path) -> None:
    raw = params.read(path)
    try:
        param_checks.validate(raw)
    except params.ParamError:
        return
    params.record_checked(raw, path)


def processes_in(folder: Path, command_part: bytes = b"") -> list[int]:
    """The pids of processes working in `folder` or below it (their cwd), whose command line has `command_part`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) != os.getpid() and command_part in (proc / "cmdline").read_bytes() and (proc / "cwd").resolve().is_relative_to(folder.resolve()):
                found.append(int(proc.name))
        except OSError:  # it ended meanwhile, or is not ours to read
            pass
    return found


def kill_session(process: subprocess.Popen) -> None:
    """kill -9 of every process in the session that `process` leads (started with start_new_session),
    again until none is left alive: a process being forked as pkill listed them (a stage that DVC
    starts) would live on and write outputs later. Then waits for `process`."""
    while alive_in_session(process.pid):
        subprocess.run(["pkill", "-KILL", "-s", str(process.pid)])
        time.sleep(0.05)
    process.wait()


def alive_in_session(session: int) -> bool:
    """Whether a process of the session is alive: a dead one (a zombie) waits to be reaped, and stays listed."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, _group, its_session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except OSError:  # it ended meanwhile
            continue
        if int(its_session) == session and state != "Z":
            return True
    return False


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the project's pipeline files in a scratch folder, which becomes the cwd."""
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    record_if_valid(tmp_path / "params.yaml")
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    return tmp_path


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    node = CURRENT_TEST.get("node")
    if STARTS_A_STAGE.search(", ".join(f'"{word}"' for word in command)) and node and not node.get_closest_marker("dvc"):
        raise AssertionError(f"{node.name} starts a stage as a process: mark it @pytest.mark.dvc (the slow tier)")
    result = subprocess.run(command, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stage(name: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", f"stages.{name}", check=check)


@pytest.fixture(scope="session")
def known_models(tmp_path_factory) -> Path:
    """check-inputs' record that the tests' model takes the tests' image size: checked once per
    session (the model registries' imports take seconds), then given to every DVC project."""
    folder = tmp_path_factory.mktemp("known_models")
    (folder / ".dvc/tmp").mkdir(parents=True)
    here = os.getcwd()
    os.chdir(folder)
    try:
        check_inputs.check_model(FAST["model"], FAST["data.image_size"])
    finally:
        os.chdir(here)
    return folder / ".dvc/tmp" / check_inputs.KNOWN_MODELS


@pytest.fixture
def dvc_project(project, known_models):
    """The scratch project as a git + DVC repo with one commit."""
    (project / ".gitignore").write_text((REPO / ".gitignore").read_text())
    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run("dvc", "init", "-q")
    (project / ".dvc/tmp").mkdir(exist_ok=True)
    shutil.copy(known_models, project / ".dvc/tmp" / check_inputs.KNOWN_MODELS)
    shutil.copy(REPO / ".dvc/config", project / ".dvc/config")  # reflink or copy, no analytics
    run("git", "add", "-A")
    run("git", "commit", "-qm", "project")
    return project


def needs_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent: ../shared exists only on our machines")


def unpack_cifar_jpeg(folder: Path, per_class: int) -> Path:
    """The first `per_class` images of each class and split of ../shared's CIFAR-10 JPEG copy."""
    first = {f"{i:04d}.jpg" for i in range(per_class)}
    with tarfile.open(CIFAR_JPEG) as archive:
        members = [m for m in archive.getmembers() if m.isdir() or m.name.rsplit("/", 1)[-1] in first]
        archive.extractall(folder / "cifar", members=members, filter="data")
    return folder / "cifar"


class RunsCode:
    """Unpickling this calls os.system: what a malicious file on a shared remote could do."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def write_malicious(path, marker):
    path.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    return path


def full_model_accuracy() -> float:
    """Test accuracy of the whole model run on every test image (and its mirror image with evaluate.flip),
    in the cwd's project: what evaluate computed for feature extraction before it read the cache."""
    import torch

    from stages.data import arrays, streaming
    from stages.model import backbones, devices, hardware, inference
    from stages.pipeline import outputs, trained
    p = params.load()
    device = devices.setup(p.device)
    images, labels = arrays.open_split(outputs.PREPARED, "test")
    network = backbones.build(p.model, p.model_weights, arrays.num_classes(outputs.PREPARED))
    trained.load_into(network.model if p.strategy != "feature_extraction" else network.head, p.strategy)
    model = devices.place(network.model, device)
    preprocess = network.preprocess.at(p.data.image_size, p.data.crop_pct)
    logits = sum(inference.predict(model, streaming.split_inputs(images, preprocess, 64, device, flip), device,
                                   hardware.bf16_on_cpu(p.cpu_bf16))
                 for flip in ((False, True) if p.evaluate.flip else (False,)))
    return inference.loss_and_accuracy(logits, torch.from_numpy(labels))[1]
