"""What cache-features hands to train-heads and evaluate: data/features/<split>[_flip].npy, fp16
N×D, and manifest.json, which records what the features were made from (identity.stage_inputs of
cache-features) and whether the head that reads them is one Linear."""
from stages.pipeline import outputs
from stages.pipeline.errors import UserError
from stages.pipeline.identity import stage_inputs
from stages.pipeline.params import Params

MANIFEST = outputs.FEATURES / "manifest.json"


def made_from(p: Params) -> dict:
    """What cache-features reads under these params: taken before it starts, written by write_manifest."""
    return stage_inputs("cache-features", p.model_weights)


def write_manifest(p: Params, inputs: dict, splits: dict, precision: str, device: str, head_is_linear: bool) -> None:
    outputs.write_json(MANIFEST, {
        "model": p.model, "weights": p.weights, "image_size": p.data.image_size, "crop_pct": p.data.crop_pct,
        "dtype": "float16", "precision": precision, "splits": splits, "device": device,
        "head_is_linear": head_is_linear, "made_from": inputs})


def read_manifest() -> dict:
    return outputs.read_json(MANIFEST)


def check_current(p: Params) -> None:
    """The cache was made from what cache-features would read now (the same data, code, weights and
    params): else a one-line UserError naming what changed. DVC reruns cache-features when they
    change; this catches a stage run by hand on a stale cache, exactly and without running the model."""
    changed = differences(read_manifest().get("made_from", {}), made_from(p))
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise UserError(f"{outputs.FEATURES}/ was cached from other inputs than these ({shown} changed since), "
                        "so it does not come from this backbone and these images: run dvc repro cache-features")


def differences(made_from: dict, now: dict) -> list[str]:
    """The deps and params whose content or value differs between two stage_inputs."""
    return [key for part in ("deps", "params") for key in sorted({*made_from.get(part, {}), *now[part]})
            if made_from.get(part, {}).get(key) != now[part].get(key)]
