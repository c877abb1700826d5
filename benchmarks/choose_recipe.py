"""The runs that chose the `best` protocol's settings: candidates scored on the validation split only.

    python -m benchmarks.choose_recipe finetune --root /tmp/cifar500 \\
        --model timm/tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0.in1k.pth
    python -m benchmarks.choose_recipe probe --root /tmp/cifar500 --model timm/tf_efficientnet_lite0 \\
        --weights ../shared/weights/tf_efficientnet_lite0.in1k.pth --only penultimate,no-flipped-features,crop-0.875
    python -m benchmarks.choose_recipe probe --model alexnet --weights imagenet \\
        --image-size 224 --only penultimate,fc6,body                   # which layer feeds AlexNet's probe
    python -m benchmarks.choose_recipe lp_ft --root /tmp/cifar500 --per-class 10 \\
        --model timm/tf_efficientnet_lite0 --weights ../shared/weights  # the rates and BatchNorm handling

Each candidate is the `best` protocol (stages/study/protocols.yaml; for scratch its scratch recipe on
top) with a few overrides, run by the stages themselves (prepare-data once, then cache-features and
train-heads, or finetune, or for lp_ft the probe once and finetune from it) in a scratch folder,
without DVC. Printed per candidate: the best validation accuracy, the epoch or
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
from stages.study.experiments import flat, nest

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
RATES_AND_NORMS = {  # for finetune, lp_ft and scratch: the question, rates against BatchNorm's statistics
    "best": {},
    "rates-10x-lower": {"finetune.lr": "x0.1", "finetune.backbone_lr": "x0.1"},  # "x": times the recipe's
    "frozen-norms": {"finetune.freeze_norm_stats": True},
    "rates-10x-lower-frozen-norms": {"finetune.lr": "x0.1", "finetune.backbone_lr": "x0.1",
                                     "finetune.freeze_norm_stats": True},
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


def run_candidate(scratch: Path, shared: dict, params: dict, strategy: str) -> dict:
    """Runs one candidate in its own folder; `shared` holds what the first one made that the others reuse
    (the prepared arrays; for lp_ft the features and the probe, which no candidate changes)."""
    folder = scratch / params["_name"]
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in params.items() if k != "_name"}))
    stage(folder, "check_inputs")
    made = {outputs.PREPARED: "prepare_data"}
    if strategy in ("probe", "lp_ft"):
        made.update({outputs.FEATURES: "cache_features", outputs.MODELS["feature_extraction"]: "train_heads",
                     outputs.LIVE["feature_extraction"]: "train_heads"})
    for path, name in made.items():
        if path in shared and strategy != "probe" or path == outputs.PREPARED and path in shared:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).symlink_to(shared[path])
        else:
            if not (folder / path).exists():
                stage(folder, name)
            shared.setdefault(path, folder / path)
    if strategy != "probe":
        stage(folder, "finetune")
    summary = outputs.read_json(folder / outputs.LIVE[params["strategy"]] / "metrics.json")
    return {"folder": folder, "summary": summary}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("strategy", choices=["finetune", "probe", "lp_ft", "scratch"])
    parser.add_argument("--root", help="an image folder with train/ and test/; default: CIFAR-10 in data/raw")
    parser.add_argument("--model", default="timm/tf_efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="imagenet, none, a state_dict file or a folder of them")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--per-class", type=int, help="data.train_per_class (default: every training image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated candidate names")
    args = parser.parse_args()
    candidates = {"finetune": {**FINETUNE_CANDIDATES, **RATES_AND_NORMS}, "probe": PROBE_CANDIDATES}.get(
        args.strategy, RATES_AND_NORMS)
    chosen = args.only.split(",") if args.only else list(candidates)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    nest(protocols.overrides("best"), into=base)
    if args.strategy == "scratch":
        nest(protocols.overrides("best", scratch=True), into=base)
    weights = "none" if args.strategy == "scratch" else args.weights
    nest({"model": args.model, "data.image_size": args.image_size, "seed": args.seed,
          "data.train_per_class": args.per_class,
          "weights": str(Path(weights).resolve()) if Path(weights).exists() else weights,
          "data.source": "imagefolder" if args.root else "cifar10",
          "data.root": str(Path(args.root or "data/raw").resolve()),
          "strategy": {"probe": "feature_extraction", "scratch": "finetune"}.get(args.strategy, args.strategy)},
         into=base)
    rows, shared = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in chosen:
            changes = {key: float(value[1:]) * flat(base)[key] if str(value).startswith("x") else value
                       for key, value in candidates[name].items()}
            params = nest(changes, into=json.loads(json.dumps(base)))
            params["_name"] = name
            s = run_candidate(Path(scratch), shared, params, args.strategy)["summary"]
            rows.append((name, s["best_val_accuracy"], s.get("best_epoch"), s.get("probe_l2"), s["time_s"]))
            print(f"{name}: {rows[-1]}", flush=True)
        print("\n| candidate | best val accuracy | best epoch | L2 | training s |\n|---|---:|---:|---:|---:|")
        for name, accuracy, epoch, l2, seconds in rows:
            print(f"| {name} | {accuracy:.4f} | {epoch} | {l2 if l2 is not None else ''} | {seconds:.1f} |")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
