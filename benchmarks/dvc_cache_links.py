"""Seconds DVC spends on a large feature file with cache.type reflink,copy (our default) and hardlink,symlink.

    python -m benchmarks.dvc_cache_links                  # a 1.1 GB output, in a temporary folder under /tmp
    python -m benchmarks.dvc_cache_links --gb 5 --dir /scratch

For each cache type, a scratch git + DVC repository holds a one-stage pipeline whose command
writes data/features/train.npy (fp16, numpy, as cache-features writes it). Measured:

    commit       what `dvc repro` adds after the stage's command (hashing the output, putting it
                 in the cache, linking or copying it back, writing dvc.lock): the wall time of
                 `dvc repro` less the command's own time, which the command writes down
    no-op repro  `dvc repro` again, nothing changed
    disk         what the repository takes on disk, each inode counted once

The repositories are deleted at the end. Needs about 3 × --gb of free space.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE_TYPES = ("reflink,copy", "hardlink,symlink")  # the default, and the opt-in for very large caches
FEATURES = 4096  # values per feature vector: AlexNet's and VGG16's FC7 width
STAGE = '''\
import sys, time
from pathlib import Path
import numpy as np
started = time.perf_counter()
Path("data/features").mkdir(parents=True, exist_ok=True)
rows, chunk = {rows}, 16384
features = np.lib.format.open_memmap("data/features/train.npy", mode="w+", dtype=np.float16, shape=(rows, {dim}))
pattern = np.random.default_rng(0).standard_normal((chunk, {dim})).astype(np.float16)
for start in range(0, rows, chunk):
    features[start:start + chunk] = pattern[:rows - start]
    pattern[0, 0] += 1  # no two chunks alike, as real features
features.flush()
Path("command_s").write_text(str(time.perf_counter() - started))
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.1, help="size of the feature file")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the scratch repositories go")
    args = parser.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's dvc
    rows = int(args.gb * 1e9 / (FEATURES * 2))
    free = shutil.disk_usage(args.dir).free
    if free < 3.2 * args.gb * 1e9:
        sys.exit(f"{args.dir} has {free / 1e9:.1f} GB free; this needs about {3.2 * args.gb:.1f} GB")
    print(f"dvc {run('dvc', '--version').strip()}, {rows} × {FEATURES} fp16 = {rows * FEATURES * 2 / 1e9:.2f} GB, "
          f"in {args.dir}")
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for cache_type in CACHE_TYPES:
            repo = Path(scratch, cache_type.replace(",", "-"))
            results.append((cache_type, *measure(repo, cache_type, rows)))
            shutil.rmtree(repo)  # before the next one: the disk needs room for one at a time
    print("\n| cache.type | stage command s | commit s (repro less command) | no-op repro s | disk GB |\n"
          "|---|---:|---:|---:|---:|")
    for cache_type, command_s, commit_s, noop_s, disk in results:
        print(f"| {cache_type} | {command_s:.2f} | {commit_s:.2f} | {noop_s:.2f} | {disk / 1e9:.2f} |")


def measure(repo: Path, cache_type: str, rows: int) -> tuple[float, float, float, int]:
    repo.mkdir()
    run("git", "init", "-q", cwd=repo)
    run("dvc", "init", "-q", cwd=repo)
    run("dvc", "config", "core.analytics", "false", cwd=repo)
    run("dvc", "config", "cache.type", cache_type, cwd=repo)
    (repo / "make_features.py").write_text(STAGE.format(rows=rows, dim=FEATURES))
    (repo / "dvc.yaml").write_text(f"stages:\n  features:\n    cmd: {sys.executable} make_features.py\n"
                                   "    deps: [make_features.py]\n    outs: [data/features]\n")
    repro_s = timed("dvc", "repro", cwd=repo)
    command_s = float((repo / "command_s").read_text())
    noop_s = timed("dvc", "repro", cwd=repo)
    if "didn't change" not in run("dvc", "repro", cwd=repo):
        sys.exit(f"{cache_type}: the second dvc repro was not a no-op")
    linked = os.stat(repo / "data/features/train.npy").st_nlink > 1
    print(f"{cache_type}: repro {repro_s:.2f} s (command {command_s:.2f} s), no-op {noop_s:.2f} s, "
          f"output {'hardlinked' if linked else 'a copy'}", flush=True)
    return command_s, repro_s - command_s, noop_s, disk_usage(repo)


def disk_usage(folder: Path) -> int:
    """Bytes allocated under `folder`, a hardlinked file counted once."""
    seen, total = set(), 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            stat = os.lstat(os.path.join(root, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def timed(*command: str, cwd: Path) -> float:
    started = time.perf_counter()
    run(*command, cwd=cwd)
    return time.perf_counter() - started


def run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


if __name__ == "__main__":
    main()
