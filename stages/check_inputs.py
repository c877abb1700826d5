"""check-inputs: validates params.yaml, then fingerprints the local inputs that stages read.

    python -m stages.check_inputs        # dvc repro runs it first, every time

DVC removes a stage's outputs before it runs the stage, so every stage depends on this one,
which validates params.yaml first: a bad value stops `dvc repro` with one line, and every
earlier output stays. Then it writes data/inputs/source.json and data/inputs/weights.json,
with the content hash of a local image folder or weights file: DVC tracks params, not the
files that they name, so these make editing an image or swapping a weights file rerun what
reads it, and nothing else. Last, data/inputs/params_checked.json: the content of params.yaml
that passed, which every stage's params.load() requires. An image's hash is remembered until its
inode, size or modification time changes, so that an unchanged folder is not read again. The
stage runs every time (always_changed), but its outputs change only when the inputs do.
Downloads (CIFAR, hub weights) are checked by their own md5.
"""
import hashlib
import importlib.util
import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from stages.pipeline import outputs, param_checks, params, probe_plan
from stages.pipeline.errors import run_stage

KNOWN_MODELS = "known_models.json"  # model names and image sizes checked, per registry version and checking code
FILE_HASHES = "file_hashes.json"  # {the last image folder hashed: {file: "inode:size:mtime_ns:sha256"}}


def main():
    raw = params.read()
    p = param_checks.validate(raw)
    check_model(p.model, p.data.image_size)
    train_counts = None
    if p.data.source == "imagefolder":  # its class folders, before DVC removes prepare-data's outputs
        from stages.data import sources
        train_counts = {c: len(paths) for c, paths in sources.list_splits(Path(p.data.root))[1]["train"].items()}
    check_train_per_class(p.data, train_counts)
    outputs.write_json(outputs.INPUTS / "source.json", source_fingerprint(p.data))
    outputs.write_json(outputs.INPUTS / "weights.json", weights_fingerprint(p.model, p.model_weights))
    probe_plan.write(p.probes)
    params.record_checked(raw)  # last: what the stages read has passed every check
    print(f"params.yaml, {p.model} at {p.data.image_size} px and the inputs checked: {outputs.INPUTS}/ written")


def check_model(name: str, image_size: int) -> None:
    """The model's name (check_model_name imports the model registries: seconds) and that
    its body takes images of `image_size` (built on the meta device: seconds too), each once per
    registry version: what passed is remembered in KNOWN_MODELS."""
    builder = importlib.util.find_spec("stages.model.backbones").origin  # found without importing torch
    checkers = hashlib.sha256(Path(builder).read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    registries = f"torchvision {version('torchvision')}, timm {version('timm')}, checks {checkers}"
    known = recalled(KNOWN_MODELS)
    sizes = known.get(registries) if isinstance(known.get(registries), dict) else {}
    if image_size in sizes.get(name, []):
        return
    if name not in sizes:
        check_model_name(name)
    check_image_size(name, image_size)
    remember(KNOWN_MODELS, {registries: {**sizes, name: sorted({*sizes.get(name, []), image_size})}})


def check_image_size(name: str, size: int) -> None:
    """Runs the body on the meta device (no memory, no compute): too small a size is a user error.
    In eval mode, so that BatchNorm judges the size, not the probe's batch of one."""
    import torch  # only when a model or size is new

    from stages.model import backbones

    def works(side: int) -> bool:
        try:
            body(torch.empty(1, 3, side, side, device="meta"))
            return True
        except RuntimeError:
            return False

    with torch.device("meta"):
        body = backbones.build(name, "none", 2).body.eval()
    if not works(size):
        smallest = next((side for side in range(size + 1, 1025) if works(side)), None)
        if smallest is None:  # no size works: the error is not about the size, and is shown as it is
            body(torch.empty(1, 3, size, size, device="meta"))
        raise params.ParamError(f"params.yaml: data.image_size {size} is too small for {name}: "
                                f"the smallest size that works is {smallest}")


def check_model_name(name: str) -> None:
    if name.startswith("timm/"):
        import timm
        known = bool(timm.list_models(name.removeprefix("timm/")))
    else:
        import torchvision
        known = name in torchvision.models.list_models(module=torchvision.models)
    if not known:
        raise params.ParamError("params.yaml: model is not a torchvision classification model nor timm/<a timm model "
                                "name>", name, restore_hint=True)


def check_train_per_class(data: params.DataParams, train_counts: dict[str, int] | None = None) -> None:
    """data.train_per_class against the training images that each class will have after the cap and
    the validation carve, before DVC removes anything (the training stages check the prepared split
    again, where unreadable images may have been skipped). `train_counts`: an image folder's image
    files per class in train/, when the caller has listed it already."""
    if data.train_per_class is None:
        return
    from stages.data import sources
    name, left = min(sources.train_left(data, train_counts).items(), key=lambda item: item[1])
    if data.train_per_class > left:
        raise params.ParamError("params.yaml: data.train_per_class must be at most the training images of each "
                                f"class after the validation carve: {name} has {left}", data.train_per_class,
                                restore_hint=True)


def source_fingerprint(data: params.DataParams) -> dict:
    if data.source == "imagefolder":
        return {"source": "imagefolder", "sha256": folder_sha256(Path(data.root))}
    return {"source": data.source}  # CIFAR: torchvision checks the archive's md5; synthetic: generated


def weights_fingerprint(model: str, weights: str) -> dict:
    if weights == "none":
        return {"weights": "none"}
    if weights == "imagenet":  # downloads are checked against the hash in their file name
        package = "timm" if model.startswith("timm/") else "torchvision"
        return {"weights": "imagenet", "model": model, package: version(package)}
    with open(weights, "rb") as file:
        return {"weights": "file", "sha256": hashlib.file_digest(file, "sha256").hexdigest()}


def folder_sha256(root: Path) -> str:
    """Hash of every file's relative path and bytes under root/{train,val,test}. Each file's hash is
    remembered in FILE_HASHES with its inode, size and modification time, the rule of DVC's own
    state database: an unchanged folder costs a stat per file, not a read of every byte."""
    folder = str(root.resolve())
    remembered = remembered_hashes(folder)
    files = sorted(file for split in ("train", "val", "test") for file in files_under(root / split, split + "/"))
    hashes, unread = {}, []
    for name, entry in files:
        status = entry.stat()
        seen = f"{status.st_ino}:{status.st_size}:{status.st_mtime_ns}:"
        known = remembered.get(name)
        if isinstance(known, str) and known.startswith(seen):
            hashes[name] = known
        else:
            hashes[name] = seen
            unread.append((name, entry.path))
    for name, path in tqdm(unread, desc=f"hash {root}", unit="file", mininterval=2, disable=len(unread) < 5000):
        with open(path, "rb") as file:
            hashes[name] += hashlib.file_digest(file, "sha256").hexdigest()
    if unread or hashes.keys() != remembered.keys():
        remember(FILE_HASHES, {folder: hashes})  # one line: 60,000 entries load in 0.05 s
    return hashlib.sha256("".join(f"{name}\0{known[-64:]}\n" for name, known in hashes.items()).encode()).hexdigest()


def remembered_hashes(folder: str) -> dict:
    """FILE_HASHES' entries for `folder`."""
    remembered = recalled(FILE_HASHES).get(folder)
    return remembered if isinstance(remembered, dict) else {}


def memory_file(name: str) -> Path | None:
    """Where check-inputs remembers what it checked and hashed: the workspace's .dvc/tmp/ (None
    outside a DVC repository). `dvc exp run --queue` and `--temp` run each experiment in a copy
    whose .dvc/tmp/ is new and whose .dvc/config.local points cache.dir at the workspace's
    .dvc/cache: there the workspace's .dvc/tmp/ serves, so that no study cell checks the model or
    hashes the image folder again."""
    if not Path(".dvc").is_dir():
        return None
    from configobj import ConfigObj  # DVC's own config reader: a machine without DVC has no .dvc/
    local = Path(".dvc/config.local")
    cache = Path(ConfigObj(str(local)).get("cache", {}).get("dir", "")) if local.exists() else Path()
    shared = cache.is_absolute() and cache.name == "cache" and cache.parent.name == ".dvc"
    return (cache.parent if shared else Path(".dvc")) / "tmp" / name


def recalled(name: str) -> dict:
    """What memory_file(name) holds; nothing when it is missing or unreadable (it is a cache)."""
    path = memory_file(name)
    try:
        content = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def remember(name: str, content: dict) -> None:
    """memory_file(name) replaced at once; through a file of this process's own, since the queue's
    workers may write it at the same time."""
    path = memory_file(name)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=name, delete=False) as file:
        file.write(json.dumps(content))
    os.replace(file.name, path)


def files_under(folder: Path, prefix: str) -> Iterator[tuple[str, os.DirEntry]]:
    """(path relative to the root, entry) of every file below `folder`, through os.scandir: a
    folder of 60,000 images is listed in a tenth of the time that pathlib takes."""
    if not folder.is_dir():
        return
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield from files_under(Path(entry.path), f"{prefix}{entry.name}/")
            elif entry.is_file():
                yield prefix + entry.name, entry


if __name__ == "__main__":
    run_stage(main)
