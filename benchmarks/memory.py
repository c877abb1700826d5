"""Peak memory (RSS) of prepare-data and cache-features as the number of images grows.

    python -m benchmarks.memory                          # 10,000 and 100,000 images at 64 px
    python -m benchmarks.memory --counts 2000,20000 --size 32

For each count, writes an image folder of that many JPEGs (10 classes, 5/6 of them train), then
runs prepare-data (val carved, data.val_fraction 0.1) and cache-features (MobileNetV3-Small with
random weights, at the images' own size) in a scratch copy of the project, each as a fresh
process, and reads its peak RSS from the kernel (wait4). What counts is the growth from the
smallest count to the largest, against the growth of the prepared arrays themselves.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = 10


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="10000,100000", help="images in each folder, comma-separated")
    parser.add_argument("--size", type=int, default=64, help="side of the generated images")
    parser.add_argument("--model", default="mobilenet_v3_small")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for count in counts:
            folder = Path(scratch) / f"images-{count}"
            started = time.perf_counter()
            write_image_folder(folder, count, args.size)
            print(f"{count} images written in {time.perf_counter() - started:.0f} s", flush=True)
            project = project_copy(Path(scratch) / f"project-{count}", folder, args.size, args.model)
            subprocess.run([sys.executable, "-m", "stages.check_inputs"], cwd=project, check=True, capture_output=True)
            peaks = {stage: peak_rss_of([sys.executable, "-m", f"stages.{stage}"], project)
                     for stage in ("prepare_data", "cache_features")}
            arrays = sum(p.stat().st_size for p in (project / "data/prepared").glob("*.npy"))
            rows.append((count, arrays, peaks))
            shutil.rmtree(folder)
            shutil.rmtree(project)
            print(f"{count} images: arrays {arrays / 2**20:.0f} MiB, prepare-data {peaks['prepare_data'] / 2**20:.0f} "
                  f"MiB, cache-features {peaks['cache_features'] / 2**20:.0f} MiB peak RSS", flush=True)

    (small, small_arrays, small_peaks), (large, large_arrays, large_peaks) = rows[0], rows[-1]
    grown = large_arrays - small_arrays
    print("\n| images | arrays (MiB) | prepare-data peak RSS (MiB) | cache-features peak RSS (MiB) |")
    print("|---:|---:|---:|---:|")
    for count, arrays, peaks in rows:
        print(f"| {count:,} | {arrays / 2**20:,.0f} | {peaks['prepare_data'] / 2**20:,.0f} | "
              f"{peaks['cache_features'] / 2**20:,.0f} |")
    for stage in ("prepare_data", "cache_features"):
        growth = large_peaks[stage] - small_peaks[stage]
        print(f"{stage}: {small:,} -> {large:,} images, peak RSS grew {growth / 2**20:,.0f} MiB, "
              f"{100 * growth / grown:.1f} % of the arrays' growth ({grown / 2**20:,.0f} MiB)")


def write_image_folder(root: Path, count: int, size: int) -> None:
    """`count` JPEGs in train/ and test/ (5:1), each class a colour with noise on it."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (CLASSES, 3))
    for i in range(count):
        split = "test" if i % 6 == 5 else "train"
        label = i // 6 % CLASSES
        pixels = (colours[label] + rng.integers(-60, 61, (size, size, 3))).clip(0, 255).astype(np.uint8)
        path = root / split / f"class_{label}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)


def project_copy(project: Path, images: Path, size: int, model: str) -> Path:
    """The project's stages and params in `project`, reading `images`."""
    shutil.copytree(REPO / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(model=model, weights="none", strategy="feature_extraction", device="cpu")
    params["data"].update(source="imagefolder", root=str(images), image_size=size, crop_pct=1.0, val_fraction=0.1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def peak_rss_of(command: list[str], cwd: Path) -> int:
    """Runs `command` in `cwd` and returns its peak resident set size in bytes."""
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "PYTHONPATH": str(cwd)})
        _pid, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            stderr.seek(0)
            raise SystemExit(f"{' '.join(command)} failed in {cwd}:\n{stderr.read()[-2000:]}")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


if __name__ == "__main__":
    main()
