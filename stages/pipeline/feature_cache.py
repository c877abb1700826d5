"""What cache-features hands to train-heads and evaluate: data/features/<split>[_flip].npy (fp16
N×D) with manifest.json (their shapes, and whether the head that reads them is one Linear), and
data/features_made_from.json: the content of cache-features' deps and its params' values when it
ran (identity.stage_inputs). That record is a file of its own, which only evaluate reads, so that
a change that leaves the features as they were (a comment, features.batch_size) reruns no probe."""
from stages.pipeline import outputs
from stages.pipeline.errors import UserError
from stages.pipeline.identity import stage_inputs
from stages.pipeline.params import Params

MANIFEST = outputs.FEATURES / "manifest.json"


def made_from(p: Params) -> dict:
    """What cache-features reads under these params: taken before it starts, written by `write`."""
    return stage_inputs("cache-features", p.model_weights)


def write(p: Params, inputs_read: dict, splits: dict, precision: str, device: str, head_is_linear: bool) -> None:
    outputs.write_json(MANIFEST, {
        "model": p.model, "weights": p.weights, "image_size": p.data.image_size, "crop_pct": p.data.crop_pct,
        "dtype": "float16", "precision": precision, "splits": splits, "device": device,
        "head_is_linear": head_is_linear})
    outputs.write_json(outputs.FEATURES_MADE_FROM, inputs_read)


def read_manifest() -> dict:
    return outputs.read_json(MANIFEST)


def check_current(p: Params) -> None:
    """The cache was made from what cache-features would read now (the same data, code, weights file
    and params), or a one-line UserError naming what changed. DVC reruns cache-features when they
    change; this catches a stage run by hand on a stale cache, without running the model."""
    changed = differences(outputs.read_json(outputs.FEATURES_MADE_FROM), made_from(p))
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise UserError(f"{outputs.FEATURES}/ was cached from other inputs than these ({shown} changed since), "
                        "so it may not come from this backbone and these images: run dvc repro cache-features")


def differences(before: dict, now: dict) -> list[str]:
    """The deps and params whose content or value differs between two identity.stage_inputs."""
    return [key for part in ("deps", "params") for key in sorted({*before.get(part, {}), *now[part]})
            if before.get(part, {}).get(key) != now[part].get(key)]
