"""A study cell's fixed cost: the seconds of a cached `dvc exp run` that are not the stages' own work.

    python -m benchmarks.cell_cost                          # this checkout's stages, 5 cells
    python -m benchmarks.cell_cost --repo /path/to/checkout # another commit's, for a before/after

The cell is the one of issue #29: feature extraction on the synthetic source, resnet18 at 32 px,
random weights, 1 epoch. A scratch git + DVC repository runs it once (prepare-data and
cache-features run), then --runs cells with a new seed each, where only check-inputs,
train-heads, the skipped finetune and evaluate run. Fixed cost = wall time − train-heads'
own time_s. Then, as separate processes in that repository, what each part costs: a process
that imports torch, each stage run by hand, and `dvc status`. Then the same cells as one
`python -m stages.study` (its queue, its polling), per cell.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CELL = ["-S", "model=resnet18", "-S", "data.source=synthetic", "-S", "weights=none", "-S", "data.image_size=32",
        "-S", "train_heads.epochs=1"]  # the model first: the study takes it from --models


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose stages/, dvc.yaml, params.yaml run")
    parser.add_argument("--runs", type=int, default=5, help="cached cells to time, each with a new seed")
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's dvc
    with tempfile.TemporaryDirectory() as scratch:
        repo = project(Path(scratch, "repo"), args.repo.resolve())
        first = timed(repo, ["dvc", "exp", "run", *CELL, "-S", "seed=0"])
        cells = []
        for seed in range(1, args.runs + 1):
            wall = timed(repo, ["dvc", "exp", "run", "-S", f"seed={seed}"])
            work = json.loads((repo / "live/train_heads/metrics.json").read_text())["time_s"]
            cells.append((wall, work))
        parts = {"python -c 'import torch'": [sys.executable, "-c", "import torch"],
                 **{f"python -m stages.{s}": [sys.executable, "-m", f"stages.{s}"]
                    for s in ("check_inputs", "train_heads", "finetune", "evaluate")},
                 "dvc status": ["dvc", "status"]}
        costs = {name: statistics.median(timed(repo, command) for _ in range(3)) for name, command in parts.items()}
        seeds = ",".join(str(s) for s in range(args.runs + 1, 2 * args.runs + 1))
        study = timed(repo, [sys.executable, "-m", "stages.study", "--models", "resnet18", "--strategies",
                             "feature_extraction", "--seeds", seeds, *CELL[2:]])
    wall, work = statistics.median(w for w, _ in cells), statistics.median(t for _, t in cells)
    print(f"stages of {args.repo}, {args.runs} cached cells (medians)\n")
    print(f"| | s |\n|---|---:|\n| first cell (prepares the data and caches the features) | {first:.1f} |")
    print(f"| cached cell: wall | {wall:.1f} |\n| cached cell: train-heads' own time_s | {work:.2f} |")
    print(f"| **cached cell: fixed cost** (wall − time_s) | **{wall - work:.1f}** |")
    print(f"| cached cell in one study of {args.runs} (wall / cells, its time_s not taken off) | {study / args.runs:.1f} |")
    for name, seconds in costs.items():
        print(f"| {name} | {seconds:.2f} |")


def project(repo: Path, source: Path) -> Path:
    """A git + DVC repository with `source`'s stages, dvc.yaml and params.yaml, one commit."""
    repo.mkdir()
    shutil.copytree(source / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", "params.yaml", ".gitignore"):
        shutil.copy(source / name, repo / name)
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "bench@example.com"],
                    ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    shutil.copy(source / ".dvc/config", repo / ".dvc/config")
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    return repo


def timed(repo: Path, command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {repo}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
