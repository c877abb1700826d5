"""finetune: the backbone's unfrozen blocks and its classifier, trained on images (params.yaml's
finetune section says what each setting does).

    python -m stages.finetune                                       # or: dvc repro finetune
    torchrun --standalone --nproc-per-node=4 -m stages.finetune     # one process per GPU, by hand;
                                                                    # finetune.processes: 4 does it for dvc repro

Writes models/finetune/model.pt and DVCLive's record to live/finetune/. An interrupted run resumes
from its last checkpoint when it is rerun with the same inputs (stages/training/checkpoints.py).
"""
import sys

from stages.pipeline import outputs, params
from stages.pipeline.errors import UserError
from stages.training import distributed


def main():
    if sys.argv[1:]:
        raise UserError(f"finetune: unknown arguments {' '.join(sys.argv[1:])}: it takes none (params.yaml says all)")
    p = params.load()
    if not p.finetunes:  # before torch's import: a stage with nothing to do costs a Python start
        outputs.write_skipped(outputs.MODELS["finetune"], f"strategy is {p.strategy}", outputs.LIVE["finetune"])
        return
    outputs.require(outputs.PREPARED / "manifest.json", *([outputs.TRAINED["feature_extraction"]] if p.probes else []))
    if distributed.relaunched("stages.finetune", p.finetune.processes):
        return
    from stages.training import finetuning
    finetuning.train(p)


if __name__ == "__main__":
    distributed.run_stage(main)
