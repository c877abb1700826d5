"""One fine-tune on several processes of one machine, as torchrun runs them (torchvision's references,
nanoGPT): each process finds RANK, LOCAL_RANK and WORLD_SIZE in its environment.

    torchrun --standalone --nproc-per-node=4 -m stages.finetune   # by hand
    finetune.processes: 4                                          # or dvc repro: the stage starts torchrun itself

Each worker holds one GPU (NCCL; gloo on the CPU) and rank 0 writes. A worker's error line reaches
the launcher as a file, so that the user reads one line, not torchrun's report of a failed child.
torch is imported inside the functions: the entry point calls them before it knows it has work.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stages.pipeline import errors
from stages.pipeline.errors import UserError

if TYPE_CHECKING:
    import torch

WORKER_ERRORS = "STAGES_WORKER_ERRORS"  # a folder where each worker leaves its error line


@dataclass
class Worker:
    device: torch.device
    rank: int  # 0 .. world - 1
    world: int  # 1 without torchrun

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel over the processes; the model itself when alone."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)


def relaunched(module: str, processes: int) -> bool:
    """Runs `processes` workers of `module` under torchrun's own code (torch.distributed.run) and
    returns True once they are done; False where this process is to do the work itself."""
    if processes == 1 or "LOCAL_RANK" in os.environ:
        return False
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read as torchrun's modules load: their logs would bury the line
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its modules that ignore LOGLEVEL
    launch = ["--standalone", f"--nproc-per-node={processes}", "-m", module]
    print(" ".join(["torchrun", *launch]), flush=True)
    with tempfile.TemporaryDirectory() as said:
        os.environ[WORKER_ERRORS] = said
        try:
            run(parse_args(launch))
        except ChildFailedError as failure:
            lines = sorted(Path(said).iterdir())
            code = next(iter(failure.failures.values())).exitcode
            raise UserError(lines[0].read_text() if lines else f"a torchrun worker failed with exit code {code}") from None
    return True


def start(device_param: str, seed: int) -> Worker:
    """This process alone, or as one of torchrun's workers: the process group joined, its GPU taken."""
    import torch
    import torch.distributed as dist

    from stages.model import devices
    device = devices.setup(device_param, seed)
    if "LOCAL_RANK" not in os.environ:
        return Worker(device, 0, 1)
    die_with_launcher()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return Worker(device, dist.get_rank(), dist.get_world_size())


def finish() -> None:
    """Every worker waits for the writer, then leaves the group."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_stage(main) -> None:
    """errors.run_stage, but a worker leaves its error line to the launcher and exits at once: torch's
    C++ warnings, printed as a process group dies, would follow the line, and its threads abort an
    interpreter that exits with them alive."""
    folder = os.environ.get(WORKER_ERRORS)
    if not folder or "LOCAL_RANK" not in os.environ:
        return errors.run_stage(main)
    try:
        main()
    except UserError as error:
        Path(folder, os.environ["LOCAL_RANK"]).write_text(str(error))
        sys.stdout.flush()
        os._exit(2)


def die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so a kill -9 of the stage (or of the dvc
    above it) would leave them training, and writing checkpoints, beside the rerun."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
