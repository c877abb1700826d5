"""Writing stage outputs: fresh folders, atomic JSON, and the note of a strategy not chosen.

With cache.type hardlink (an opt-in: README "Speed"), an output file is its object in DVC's
cache, so a stage never writes into an existing output file: it removes the path first and
writes a new file.
"""
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from stages.pipeline.errors import UserError

# Every output that dvc.yaml declares, named once here (tests/test_dag.py checks the two agree)
INPUTS = Path("data/inputs")  # check-inputs: hashes of the image folder and weights file; probe.json
CHECKED_PARAMS = INPUTS / "params_checked.json"  # check-inputs: what it validated (params.load reads it)
PREPARED = Path("data/prepared")  # prepare-data: uint8 arrays per split, and the manifest
FEATURES = Path("data/features")  # cache-features
FEATURES_MADE_FROM = Path("data/features_made_from.json")  # cache-features: what it read (feature_cache.py)
FEATURE_METRICS = Path("metrics/features.json")  # cache-features: its time and images/s
# Per strategy: the training stage whose model evaluate reads (lp_ft: finetune's, started from train-heads' probe)
MODELS = {"feature_extraction": Path("models/train_heads"), "finetune": Path("models/finetune")}
LIVE = {"feature_extraction": Path("live/train_heads"), "finetune": Path("live/finetune")}  # DVCLive's
MODELS["lp_ft"], LIVE["lp_ft"] = MODELS["finetune"], LIVE["finetune"]
TRAINED = {strategy: folder / "model.pt" for strategy, folder in MODELS.items()}  # what evaluate loads
L2_SEARCH = LIVE["feature_extraction"] / "plots" / "custom" / "l2_search.json"  # the probe's val accuracy per L2
CHECKPOINTS = Path(".checkpoints/finetune")  # not an output: where an interrupted fine-tune resumes from
METRICS = Path("metrics/metrics.json")  # evaluate: test accuracy and loss, the whole cost
PLOTS = Path("plots")  # evaluate: PNGs, and plots/data for dvc plots
MADE_BY = {INPUTS: "check-inputs", PREPARED: "prepare-data", FEATURES: "cache-features",
           FEATURE_METRICS: "cache-features", FEATURES_MADE_FROM: "cache-features",
           MODELS["feature_extraction"]: "train-heads", LIVE["feature_extraction"]: "train-heads",
           MODELS["finetune"]: "finetune", LIVE["finetune"]: "finetune"}


def fresh_folder(folder: Path) -> Path:
    """An empty folder at `folder`: whatever was there (files linked into DVC's cache) is unlinked."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Where to write `path`'s new content, a file or a folder; when the block ends without an
    error, it takes `path`'s place. Readers never see half an output, a kill -9 leaves the old one
    whole, and a file that DVC linked into its cache is replaced, never written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial) if partial.is_dir() else partial.unlink(missing_ok=True)
    yield partial
    if partial.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def write_json(path: Path, content) -> None:
    with replaced(path) as partial:
        partial.write_text(json.dumps(content, indent=2) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


def write_skipped(folder: Path, why: str, live_dir: Path | None = None) -> None:
    """A strategy stage's outputs when the chosen strategy needs none: a small note in its folder
    (DVC's run-cache keeps the real outputs of the other variant) and DVCLive's files empty."""
    fresh_folder(folder)
    write_json(folder / "skipped.json", {"skipped": why})
    if live_dir:
        empty_live(live_dir)
    print(f"skipped: {why}; {folder}/skipped.json says so")


def empty_live(live_dir: Path) -> None:
    """What a training stage declares of DVCLive's files, for the strategy not chosen: no epochs.
    Header-only curves, so that `dvc plots` shows this stage's curves empty rather than failing."""
    fresh_folder(live_dir)
    empty_curves(live_dir)
    write_json(live_dir / "metrics.json", {})


def empty_curves(live_dir: Path) -> None:
    """Header-only train curves, if DVCLive logged none."""
    curves = live_dir / "plots" / "metrics" / "train"
    if curves.parent.exists():
        return
    curves.mkdir(parents=True)
    for metric in ("loss", "accuracy"):
        (curves / f"{metric}.tsv").write_text(f"step\t{metric}\n")


def require(*paths: Path) -> None:
    """A stage run by hand before the stages that make its inputs: one line naming the file and the command."""
    for path in paths:
        if not path.exists():
            stage = next(made_by for made, made_by in MADE_BY.items() if made == path or made in path.parents)
            raise UserError(f"{path} is missing: `dvc repro {stage}` makes it (and what it needs)")
