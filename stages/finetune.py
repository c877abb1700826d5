"""finetune: the backbone's unfrozen blocks and its classifier, trained on images.

    python -m stages.finetune            # or: dvc repro finetune
    # finetune.processes: 4 -> the stage relaunches itself as
    #   torchrun --standalone --nproc-per-node=4 -m stages.finetune
    # finetune.nodes: 2, finetune.rendezvous: node1:29500 -> on node1 (dvc repro finetune) it becomes
    #   torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=node1:29500 ...
    python -m stages.finetune --join     # on each other node: same commit, params.yaml and data/prepared

finetune.unfreeze: all trains every layer, as the study's notebook did; N trains the last N
blocks. data.train_per_class draws that many training images of each class (arrays.train_subset:
nested across sizes, seeded by seed). An epoch is a pass over them, or finetune.min_steps /
finetune.epochs steps if that is more (passes, each shuffled anew). The unfrozen blocks learn at finetune.backbone_lr, the classifier at finetune.lr.
Images are flipped and cropped on the device at their stored size (if asked), then resized.
A checkpoint at the end of an epoch, at most one per finetune.checkpoint_interval_s, in
.checkpoints/finetune/<fingerprint>/ (outside DVC's outputs, so that the stage stays in the
run-cache), lets an interrupted run resume: rerun the stage and it goes on from the last
checkpointed epoch; it is deleted when the stage completes.
Under torchrun (finetune.processes, finetune.nodes: stages/training/distributed.py), every process holds all
the uint8 images on its device and draws the same seeded global batches; each trains on its
share of every batch, so the global batch stays finetune.batch_size.
Writes models/finetune/model.pt and DVCLive's record to live/finetune/.
"""
import sys
from pathlib import Path

from stages.pipeline import outputs, params
from stages.training import distributed
from stages.pipeline.errors import UserError

OUT, LIVE = outputs.MODELS["finetune"], outputs.LIVE["finetune"]
CHECKPOINTS = Path(".checkpoints/finetune")


def main():
    joining = sys.argv[1:] == ["--join"]
    if sys.argv[1:] and not joining:
        raise UserError(f"finetune: unknown arguments {' '.join(sys.argv[1:])}: the only one is --join")
    p = params.load()
    if joining and (p.strategy != "finetune" or p.finetune.nodes == 1):
        raise UserError("--join: params.yaml has no run to join (it needs strategy: finetune and finetune.nodes "
                        "above 1): use the first node's params.yaml, at the same commit")
    if p.strategy != "finetune":  # before torch's import: a stage with nothing to do costs a Python start
        outputs.write_skipped(OUT, p.strategy, LIVE)
        return
    outputs.require(outputs.PREPARED / "manifest.json")
    from stages.training import finetuning
    finetuning.train(p, joining)


if __name__ == "__main__":
    distributed.run_stage(main)
