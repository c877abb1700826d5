"""What a stage spends before its first batch: reading params.yaml, its imports, the model's build.

    python -m benchmarks.startup                      # alexnet, vgg16, lite0; medians of 5 fresh processes
    python -m benchmarks.startup --models alexnet --runs 3

Each figure comes from fresh Python processes (nothing imported yet, as under `dvc repro`),
timed inside the process, median of --runs. The models are built with random weights
(weights: none), so reading a weights file is not counted.
"""
import argparse
import statistics
import subprocess
import sys

STAGES = ["check_inputs", "prepare_data", "cache_features", "train_heads", "finetune", "evaluate"]
TIMED = "import time; started = time.perf_counter(); {code}; print(time.perf_counter() - started)"


def seconds_in_fresh_process(code: str, setup: str = "", runs: int = 5) -> float:
    timings = []
    for _ in range(runs):
        script = "; ".join(filter(None, [setup, TIMED.format(code=code)]))
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"benchmark failed: {script}\n{result.stderr}")
        timings.append(float(result.stdout.split()[-1]))
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="alexnet,vgg16,timm/tf_efficientnet_lite0")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = [("param_checks.load() (check-inputs)", seconds_in_fresh_process(
        "from stages.pipeline import param_checks; param_checks.load()", runs=args.runs)),
            ("params.typed(params.read()) (a stage's load, its record check aside)", seconds_in_fresh_process(
                "from stages.pipeline import params; params.typed(params.Params, params.read())", runs=args.runs))]
    for name in STAGES:
        rows.append((f"import stages.{name}", seconds_in_fresh_process(f"import stages.{name}", runs=args.runs)))
    for model in args.models.split(","):
        rows.append((f"check_inputs.check_model_name({model!r}), uncached", seconds_in_fresh_process(
            f"check_inputs.check_model_name({model!r})", setup="from stages import check_inputs", runs=args.runs)))
        rows.append((f"backbones.build({model!r})", seconds_in_fresh_process(
            f"backbones.build({model!r}, 'none', 10)", setup="from stages.model import backbones", runs=args.runs)))
    print(f"| step (fresh process, median of {args.runs}) | seconds |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
