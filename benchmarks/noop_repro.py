"""Seconds of a no-op `dvc repro prepare-data`, by data source: what a repro costs before anything runs.

    python -m benchmarks.noop_repro --folder /tmp/cifar10-jpeg     # synthetic, that folder, large photos
    python -m benchmarks.noop_repro --photos 0                     # synthetic only

For each source, a scratch git + DVC repository with the project's stages runs `dvc repro
prepare-data` once (data.limit_per_class 5, so that decoding is short), then --runs no-op
repros, whose median is given. check-inputs, which runs every time, hashes an image folder; the
large photos (--photos of them, 1600×1200 JPEGs, generated) show whether that cost follows
the folder's bytes or its files.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="an image folder (train/, test/) to measure, such as the CIFAR-10 JPEG copy")
    parser.add_argument("--photos", type=int, default=2000, help="large generated photos to measure; 0: none")
    parser.add_argument("--runs", type=int, default=5, help="no-op repros per source")
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's dvc
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        sources = [("synthetic", {"source": "synthetic"})]
        if args.folder:
            sources.append((args.folder, {"source": "imagefolder", "root": str(Path(args.folder).resolve())}))
        if args.photos:
            photos = Path(scratch, "photos")
            write_photos(photos, args.photos)
            sources.append((f"{args.photos} photos 1600×1200", {"source": "imagefolder", "root": str(photos)}))
        for name, data in sources:
            repo = project(Path(scratch, f"repo-{len(rows)}"), data)
            first = timed(repo)
            noop = statistics.median(timed(repo) for _ in range(args.runs))
            size = folder_bytes(Path(data["root"])) if "root" in data else 0
            rows.append((name, size, first, noop))
            shutil.rmtree(repo)
    print("\n| source | folder MB | first repro s | no-op repro s (median) |\n|---|---:|---:|---:|")
    for name, size, first, noop in rows:
        print(f"| {name} | {size / 1e6:,.0f} | {first:.2f} | {noop:.2f} |")


def write_photos(root: Path, count: int) -> None:
    """`count` 1600×1200 JPEGs in two classes, train and test: noise over a gradient, about 0.5 MB each."""
    noisy = np.linspace(0, 150, 1600, dtype=np.float32)[None, :, None] + \
        np.random.default_rng(0).integers(0, 56, (1200, 1600, 3))
    for i in range(count):
        pixels = (noisy + i % 50).astype(np.uint8)
        path = root / ("test" if i % 5 == 4 else "train") / f"class_{i // 5 % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=85)


def project(repo: Path, data: dict) -> Path:
    """A git + DVC repository with the project's stages, dvc.yaml and params, reading `data`."""
    repo.mkdir()
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, repo / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(limit_per_class=5, **data)
    params.update(weights="none")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(command, cwd=repo, check=True, capture_output=True)
    return repo


def timed(repo: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(["dvc", "repro", "prepare-data"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dvc repro prepare-data failed in {repo}:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - started


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
