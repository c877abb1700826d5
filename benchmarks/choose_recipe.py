"""The runs that chose the `best` protocol's settings: candidates scored on the validation split only.

    python -m benchmarks.choose_recipe finetune --root /tmp/cifar500 \\
        --model timm/tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0.in1k.pth
    python -m benchmarks.choose_recipe probe --root /tmp/cifar500 --model timm/tf_efficientnet_lite0 \\
        --weights ../shared/weights/tf_efficientnet_lite0.in1k.pth --only penultimate,no-flipped-features,crop-0.875
    python -m benchmarks.choose_recipe probe --model alexnet --weights imagenet \\
        --image-size 224 --only penultimate,fc6,body                   # which layer feeds AlexNet's probe

Each candidate is the `best` protocol (stages/study/protocols.yaml) with a few overrides, run by the
stages themselves (prepare-data once, then cache-features and train-heads, or finetune) in a
scratch folder, without DVC. Printed per candidate: the best validation accuracy, the epoch or
L2 strength that reached it, and the training seconds. The test split is never read: evaluate
does not run. Pass the data, model and image size of the comparison you want to decide.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from stages.pipeline import outputs
from stages.study import protocols
from stages.study.experiments import nest

REPO = Path(__file__).resolve().parents[1]
FINETUNE_CANDIDATES = {  # on top of protocols.yaml's `best`
    "sgd-nesterov": {},
    "no-smoothing": {"finetune.label_smoothing": 0.0},
    "adamw": {"finetune.optimizer": "adamw", "finetune.nesterov": False, "finetune.lr": 1e-3,
              "finetune.backbone_lr": 3e-4, "finetune.weight_decay": 0.05},
    "backbone-lr-0.02": {"finetune.backbone_lr": 0.02, "finetune.lr": 0.1},
    "last-2-blocks": {"finetune.unfreeze": 2},
    "10-epochs": {"finetune.epochs": 10},
    "readme-protocol": {k: v for k, v in protocols.overrides("readme").items() if k.startswith("finetune.")},
}
PROBE_CANDIDATES = {  # on top of `best`; fc6 and body only for AlexNet and VGG16
    "penultimate": {},
    "no-flipped-features": {"features.flip": False},
    "crop-0.875": {"data.crop_pct": 0.875},
    "fc6": {"train_heads.probe_layer": "fc6"},
    "body": {"train_heads.probe_layer": "body"},
}


def stage(folder: Path, name: str) -> None:
    result = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode:
        raise SystemExit(f"stages.{name} failed in {folder}:\n{result.stdout[-2000:]}")


def run_candidate(scratch: Path, prepared: Path | None, params: dict, strategy: str) -> dict:
    folder = scratch / params["_name"]
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in params.items() if k != "_name"}))
    if prepared is None:
        stage(folder, "prepare_data")
    else:
        (folder / outputs.PREPARED).parent.mkdir()
        (folder / outputs.PREPARED).symlink_to(prepared)
    if strategy == "probe":
        stage(folder, "cache_features")
    stage(folder, "train_heads" if strategy == "probe" else "finetune")
    summary = outputs.read_json(folder / outputs.LIVE[params["strategy"]] / "metrics.json")
    return {"folder": folder, "summary": summary}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", choices=["finetune", "probe"])
    parser.add_argument("--root", help="an image folder with train/ and test/; default: CIFAR-10 in data/raw")
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--only", help="comma-separated candidate names")
    args = parser.parse_args()
    candidates = FINETUNE_CANDIDATES if args.strategy == "finetune" else PROBE_CANDIDATES
    chosen = args.only.split(",") if args.only else list(candidates)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    nest(protocols.overrides("best"), into=base)
    nest({"model": args.model, "data.image_size": args.image_size,
          "weights": str(Path(args.weights).resolve()) if Path(args.weights).is_file() else args.weights,
          "data.source": "imagefolder" if args.root else "cifar10",
          "data.root": str(Path(args.root or "data/raw").resolve()),
          "strategy": "finetune" if args.strategy == "finetune" else "feature_extraction"}, into=base)
    rows, prepared = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for name in chosen:
            params = nest(candidates[name], into=json.loads(json.dumps(base)))
            params["_name"] = name
            result = run_candidate(Path(scratch), prepared, params, args.strategy)
            prepared = prepared or result["folder"] / outputs.PREPARED
            s = result["summary"]
            rows.append((name, s["best_val_accuracy"], s.get("best_epoch"),
                         s.get("probe_l2"), s["time_s"]))
            print(f"{name}: {rows[-1]}", flush=True)
        print("\n| candidate | best val accuracy | best epoch | L2 | training s |\n|---|---:|---:|---:|---:|")
        for name, accuracy, epoch, l2, seconds in rows:
            print(f"| {name} | {accuracy:.4f} | {epoch} | {l2 if l2 is not None else ''} | {seconds:.1f} |")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
