"""Process-group setup for every launcher: plain `python`, `torchrun`, the `deepspeed` launcher, `srun`.

Rank, world size and local rank come from `xtalgen.launcher` (shared with sampling): the torch
launcher variables (RANK/WORLD_SIZE/LOCAL_RANK, set by torchrun and the deepspeed launcher), then
Slurm's (SLURM_PROCID, SLURM_STEP_NUM_TASKS or else SLURM_NTASKS, SLURM_LOCALID: one task per
process under `srun`), then a single process. The rendezvous address under Slurm is the first host
of the allocation (`scontrol show hostnames`). Backend: NCCL with CUDA, gloo on CPU.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xtalgen.launcher import SLURM, TORCHRUN, launch_env

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slurm_master_addr(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = []
    # Without scontrol (e.g. a container), a plain single-host nodelist is already a hostname.
    return hosts[0] if hosts else nodelist.split(",")[0]


def launcher_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK/WORLD_SIZE this process should use."""
    env = dict(os.environ if env is None else env)
    launch = launch_env(env)
    if launch.launcher == SLURM:  # srun, one task per process
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        master_addr = env.get("MASTER_ADDR") or _slurm_master_addr(env)
        # A port derived from the job id lets two jobs share a node without colliding.
        master_port = env.get("MASTER_PORT") or str(DEFAULT_PORT + job_id % 10000)
    else:  # torchrun and the deepspeed launcher export MASTER_*; one process takes any free port
        master_addr = env.get("MASTER_ADDR", "127.0.0.1")
        master_port = env.get("MASTER_PORT") or str(DEFAULT_PORT if launch.launcher == TORCHRUN else _free_port())
    return {
        "RANK": str(launch.rank),
        "WORLD_SIZE": str(launch.world_size),
        "LOCAL_RANK": str(launch.local_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": master_port,
    }


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and pick this rank's device."""
    from xtalgen.train import parallelize

    os.environ.update(launcher_environment())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    on_gpu = parallelize.accelerator_name() == "cuda"
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        parallelize.set_accelerator_device(local_rank)
    if not dist.is_initialized():
        parallelize.init_process_group(backend, timeout_minutes)
    device = parallelize.accelerator_device(local_rank) if on_gpu else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 tensor over ranks (no-op with one process); returns a CPU tensor."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    # NCCL needs device tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buffer = values.to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_SHUTDOWN_AT_EXIT = False


def shutdown_distributed_at_exit() -> None:
    """Destroy the process group when this process exits (atexit), before the interpreter is torn down.

    A process that exits with its gloo group alive can abort at interpreter shutdown ("terminate
    called without an active exception", exit code -6 instead of its own): the group's worker
    threads still hold tensors whose release needs the interpreter that is being torn down.
    Destroying the group earlier, when the command returns, would break a process that runs
    several commands (DeepSpeed caches its groups), hence atexit. Call it only where every rank is
    known to have left its collectives (after `stop_together`, or at the end of a finished run):
    destroying a group while a peer still waits in one can hang.
    """
    global _SHUTDOWN_AT_EXIT
    if not _SHUTDOWN_AT_EXIT:
        _SHUTDOWN_AT_EXIT = True
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class StoppedByPeer(RuntimeError):
    """Another rank failed at the same point of the run and reports the error itself."""

    def __init__(self, rank: int):
        self.rank = rank
        super().__init__(f"rank {rank} stopped the run")


def stop_together(error: BaseException | None) -> None:
    """Every rank calls this at the same point, `error` being what it met there (None if nothing).

    If any rank met an error, every rank raises: the lowest such rank its own error, every other
    rank `StoppedByPeer`. So one rank reports the cause once, however many met it (the same damaged
    file seen at start-up by every rank is one message, not one per rank), and no rank is left
    waiting in a collective for a peer that has gone (gloo then fails with "connection closed by
    peer", NCCL hangs until its timeout). With one process it simply raises `error`.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    flags = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    flags[dist.get_rank()] = float(error is not None)
    failed = torch.nonzero(all_reduce_sum(flags)).flatten().tolist()
    if not failed:
        return
    if failed[0] == dist.get_rank():
        raise error
    raise StoppedByPeer(failed[0])
