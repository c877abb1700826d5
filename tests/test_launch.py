"""The launch files where no cluster is needed: the Kubernetes Job against the API's own schemas, and
both files' requests and arguments. tests/test_slurm.py runs launch/slurm.sh on a real SLURM cluster;
no Kubernetes cluster runs here."""
import copy
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from stages.study import grid as study
from tests.conftest import REPO

JOB = yaml.safe_load((REPO / "launch/kubernetes-job.yaml").read_text())
SLURM_SCRIPT = (REPO / "launch/slurm.sh").read_text()
OLDEST, NEWEST = "1.25.0", kubernetes_validate.latest_version()  # the package's first and last schemas


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_the_kubernetes_job_is_valid_against_the_api_schemas_and_a_wrong_field_is_not(version):
    kubernetes_validate.validate(JOB, version, strict=True)
    misspelt = copy.deepcopy(JOB)
    misspelt["spec"]["completion"] = misspelt["spec"].pop("completions")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, version, strict=True)


def test_the_kubernetes_job_passes_its_args_to_the_study_and_asks_for_no_gpu():
    spec, study_container = JOB["spec"], container(JOB)
    env = {item["name"]: item.get("value") for item in study_container["env"]}
    assert spec["completions"] == spec["parallelism"] == int(env["JOB_COMPLETIONS"])
    bash, flags, script, name = study_container["command"]
    assert (bash, flags) == ("bash", "-euc") and name == "transfer-study"  # so that args are the script's "$@"
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    assert re.search(r'python -m stages.study --remote origin "\$@"\n', script)
    study.parse_args(study_container["args"])  # as the study reads them: a mistake raises UserError
    assert "nvidia.com/gpu" not in str(study_container["resources"])  # CPU nodes can run it as written
    assert study_container["resources"]["requests"]["memory"] == study_container["resources"]["limits"]["memory"]
    assert "/work" in {mount["mountPath"] for mount in study_container["volumeMounts"]} and spec["ttlSecondsAfterFinished"]


def test_the_slurm_script_asks_for_memory_and_for_no_gpu():
    requests = re.findall(r"^#SBATCH (--[\w-]+)", SLURM_SCRIPT, re.MULTILINE)
    assert "--mem" in requests and not {"--gpus", "--gres", "--gpus-per-task"} & set(requests)
    assert subprocess.run(["bash", "-n", str(REPO / "launch/slurm.sh")]).returncode == 0
