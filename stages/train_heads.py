"""train-heads: the classifier trained on the cached features (feature extraction; params.yaml's
train_heads section says what each setting does).

    python -m stages.train_heads         # or: dvc repro train-heads

Writes models/train_heads/model.pt (the best epoch by val accuracy, the last one without a
validation split, or the probe, its features' standardisation folded in) and its record to
live/train_heads/, in DVCLive's layout, written at the end (training/loop.py's Record).
"""
from stages.pipeline import feature_cache, outputs, params, probe_plan
from stages.pipeline.errors import run_stage


def main():
    p = params.load()
    if not probe_plan.probes(p.probes):  # before torch's import: a stage with nothing to do costs a Python start
        outputs.write_skipped(outputs.MODELS["feature_extraction"], "the strategy trains no probe",
                              outputs.LIVE["feature_extraction"])
        outputs.write_json(outputs.L2_SEARCH, [])
        return
    outputs.require(outputs.PREPARED / "manifest.json", feature_cache.MANIFEST)
    from stages.training import heads
    heads.train(p)


if __name__ == "__main__":
    run_stage(main)
