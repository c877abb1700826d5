"""Fine-tuning on several processes and nodes: the stage relaunches itself under torchrun, and each
process it starts is a worker. The one question, "am I a worker, and which?", is start()'s.

    finetune.processes: 4                 -> torchrun --standalone --nproc-per-node=4 -m stages.finetune
    finetune.nodes: 2, rendezvous: n1:29500 -> torchrun --nnodes=2 ... --rdzv-endpoint=n1:29500 -m stages.finetune

A worker joins the process group (NCCL with one GPU per process, gloo on the CPU), dies with the
launcher, and compares its params and data with the writer's before any other collective. Only
one process writes outputs and logs: local rank 0 of the first node, the one DVC started
(torchrun's c10d rendezvous numbers the nodes in no set order, so global rank 0 may be on a
joining node). A worker's error reaches the launcher as a file, which prints one line for all.
torch is imported inside the functions: finetune.py enters through run_stage before it knows
whether it has anything to do.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
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
from stages.pipeline.params import FinetuneParams

if TYPE_CHECKING:
    import torch

WRITER_NODE = "STAGES_WRITER_NODE"  # set by the launcher on the node that DVC started
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


def start(cfg: FinetuneParams, device_param: str, seed: int, first_node: bool, fingerprint: str) -> Worker | None:
    """This process as a worker; None in the process that launched the workers under torchrun, once
    they are done. `fingerprint`: the params and data that every node must share."""
    import torch
    import torch.distributed as dist

    from stages.model import devices
    if "LOCAL_RANK" not in os.environ:
        if cfg.processes > 1 or cfg.nodes > 1:
            return relaunch(cfg, first_node)
        return Worker(devices.setup(device_param, seed), 0, 1)
    die_with_launcher()
    device = devices.setup(device_param, seed)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=cfg.join_timeout_s))  # a node died: fail, not hang
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    if cfg.nodes > 1:  # before any other collective: one that differs in shape across nodes would hang
        same_inputs_on_every_node(fingerprint, dist.get_world_size())
    return Worker(device, dist.get_rank(), dist.get_world_size())


def is_writer() -> bool:
    """The one process that writes: alone, or local rank 0 on the first node."""
    import torch.distributed as dist
    return not dist.is_initialized() or (os.environ.get(WRITER_NODE) == "1" and os.environ.get("LOCAL_RANK") == "0")


@contextlib.contextmanager
def peers(cfg: FinetuneParams):
    """Training among the workers: a lost node becomes one line; at the end, all wait for the writer."""
    import torch.distributed as dist
    try:
        yield
    except RuntimeError as error:  # gloo and NCCL raise it (or DistError, a subclass) when a peer is lost
        if cfg.nodes == 1 or not isinstance(error, dist.DistError) and "gloo" not in str(error):
            raise
        raise UserError(f"finetune: lost another node ({str(error).splitlines()[0][:120]}): it stopped or died; "
                        "run the stage again on this node and --join on the others") from None
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


def relaunch(cfg: FinetuneParams, first_node: bool) -> None:
    """Runs `processes` copies of the stage on this node with torchrun's own code (torch.distributed.run);
    with several nodes, they meet at the first node's c10d rendezvous. Its failures become one line."""
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read as torchrun's modules load: their logs would bury that line
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its modules that ignore LOGLEVEL

    if cfg.nodes == 1:
        launch = ["--standalone", f"--nproc-per-node={cfg.processes}"]
    else:
        launch = [f"--nnodes={cfg.nodes}", f"--nproc-per-node={cfg.processes}", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={cfg.rendezvous}", "--rdzv-id=finetune",
                  f"--rdzv-conf=join_timeout={cfg.join_timeout_s:g}", "--max-restarts=0"]
    print(" ".join(["torchrun", *launch, "-m", "stages.finetune"]), flush=True)
    os.environ[WRITER_NODE] = "1" if first_node else "0"
    with tempfile.TemporaryDirectory() as said:
        os.environ[WORKER_ERRORS] = said
        try:
            run(parse_args([*launch, "-m", "stages.finetune"]))
        except RendezvousTimeoutError as error:
            raise UserError(f"finetune: the {cfg.nodes} nodes did not all meet at {cfg.rendezvous} within "
                            f"{cfg.join_timeout_s:g} s ({type(error).__name__}): start `python -m stages.finetune "
                            "--join` on the others (same commit, params.yaml and data/prepared), or raise "
                            "finetune.join_timeout_s") from None
        except RendezvousError as error:  # the process that hosts the rendezvous's store is gone, or never came
            raise UserError(f"finetune: lost, or never reached, the rendezvous at {cfg.rendezvous} "
                            f"({type(error).__name__}): a node stopped, or the first one is not running: run the "
                            "stage there first, then `python -m stages.finetune --join` on the others") from None
        except ChildFailedError as failure:
            lines = sorted(Path(said).iterdir())
            if lines:
                raise UserError(lines[0].read_text()) from None
            codes = [f.exitcode for f in failure.failures.values()]
            raise UserError(f"finetune: a process on this node failed with exit code {codes[0]}") from None


def die_with_launcher() -> None:
    """torchrun starts each process in a session of its own, so a kill -9 of the stage (or of the
    dvc above it) would leave them training, and writing checkpoints, beside the rerun."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def same_inputs_on_every_node(fingerprint: str, world: int) -> None:
    """Every process's fingerprint against the writer's: a node with other params or data says so."""
    import torch.distributed as dist
    found = [None] * world
    dist.all_gather_object(found, (is_writer(), fingerprint))
    first = next(k for writer, k in found if writer)
    fix = "the same commit and params.yaml, then `dvc pull` or `dvc repro prepare-data`"
    if fingerprint != first:
        raise UserError(f"finetune --join: params.yaml or data/prepared here differ from the first node's: use {fix}")
    if any(k != first for _, k in found):
        raise UserError(f"finetune: a joining node's params.yaml or data/prepared differ from this node's: give it {fix}")
