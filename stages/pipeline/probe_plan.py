"""What check-inputs hands to cache-features and train-heads: data/inputs/probe.json, whether the
strategy trains a probe (feature extraction, lp_ft). It is their dep instead of the strategy, the
same for both strategies, so that the two share those stages' run-cache."""
from stages.pipeline import outputs
from stages.pipeline.errors import UserError

PATH = outputs.INPUTS / "probe.json"


def write(strategy_probes: bool) -> None:
    outputs.write_json(PATH, {"probe": strategy_probes})


def probes(strategy_probes: bool) -> bool:
    """Whether the strategy trains a probe, as check-inputs wrote it: it must agree with params.yaml
    (`strategy_probes`), or it is stale."""
    outputs.require(PATH)
    if outputs.read_json(PATH)["probe"] != strategy_probes:
        raise UserError(f"{PATH} was written for another strategy than params.yaml's: "
                        "`dvc repro` (or python -m stages.check_inputs) writes it anew")
    return strategy_probes
