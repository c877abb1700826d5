"""train-heads: the classifier trained on the cached features (feature extraction).

    python -m stages.train_heads         # or: dvc repro train-heads

The head is the backbone's own classifier with a new last Linear. train_heads.trainable: last
trains only that Linear, as the study's notebook did: FC6 and FC7 of AlexNet and VGG16 keep
their ImageNet values, and their Dropout stays active in training. `classifier` trains all of
it. Flipped-image features (features.flip) stand in for augmentation. train_heads.solver: lbfgs
fits the last Linear as a linear probe instead (stages/training/probe.py): logistic regression to
convergence, its L2 strength chosen on the validation split, then refitted on train + val (on
train alone with data.train_per_class, where val only chooses); the standardisation of the
features is folded into the saved Linear. data.train_per_class draws that many training images
of each class (arrays.train_subset: nested across sizes, seeded by seed). Writes
models/train_heads/model.pt (the best epoch by val accuracy, the last one without a
validation split, or the probe) and DVCLive's record to live/train_heads/.
"""
from stages.pipeline import outputs, params
from stages.pipeline.errors import run_stage

OUT, LIVE = outputs.MODELS["feature_extraction"], outputs.LIVE["feature_extraction"]
L2_SEARCH = LIVE / "plots" / "custom" / "l2_search.json"  # validation accuracy per L2 strength (dvc.yaml)


def main():
    p = params.load()
    if p.strategy != "feature_extraction":  # before torch's import: a stage with nothing to do costs a Python start
        outputs.write_skipped(OUT, p.strategy, LIVE)
        outputs.write_json(L2_SEARCH, [])
        return
    outputs.require(outputs.PREPARED / "manifest.json", outputs.FEATURES / "manifest.json")
    from stages.training import heads
    heads.train(p)


if __name__ == "__main__":
    run_stage(main)
