"""Which process of a launch this is: rank, world size and local rank, read from the environment.

One reading for every command that runs as several processes (`xtalgen train`, `xtalgen sample`), so
they never disagree about it. In order:

  torchrun / deepspeed   RANK, WORLD_SIZE (both needed) and LOCAL_RANK (default 0); also a user's
                         own setup. They win over Slurm's: torchrun started inside an srun task
                         numbers its own processes.
  slurm                  SLURM_PROCID, the step's task count (see `_slurm_world_size_key`) and
                         SLURM_LOCALID (default 0); one process per Slurm task, as `srun` starts them.
  single                 rank 0 of 1.

Only the standard library: importable from every subpackage, importing none (import-linter contract).
Rendezvous (MASTER_ADDR/MASTER_PORT) stays with training, the only user (xtalgen.train.distributed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

TORCHRUN = "torchrun"
SLURM = "slurm"
SINGLE = "single"


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # TORCHRUN, SLURM or SINGLE: where the numbers came from


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process's place in its launch, from `environ` (default: os.environ).

    Raises ValueError when the variables disagree (a rank outside 0..world size - 1) or are not integers.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank_key, world_key, local_key, launcher = "RANK", "WORLD_SIZE", "LOCAL_RANK", TORCHRUN
    elif "SLURM_PROCID" in env and (world_key := _slurm_world_size_key(env)):
        rank_key, local_key, launcher = "SLURM_PROCID", "SLURM_LOCALID", SLURM
    else:
        return LaunchEnv(rank=0, world_size=1, local_rank=0, launcher=SINGLE)
    rank, world_size = _int(env, rank_key), _int(env, world_key)
    if not 0 <= rank < world_size:
        raise ValueError(f"{rank_key}={rank} is outside 0..{world_size - 1} ({world_key}={world_size})")
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=_int(env, local_key, 0), launcher=launcher)


def _slurm_world_size_key(env: Mapping[str, str]) -> str | None:
    """The variable holding the number of tasks of this Slurm job *step*: SLURM_STEP_NUM_TASKS, else
    SLURM_NTASKS (None if neither is set).

    Under `srun` (inside an `sbatch` allocation or not) every task has SLURM_STEP_NUM_TASKS, the
    step's task count: the right world size. srun also rewrites SLURM_NTASKS to the same number,
    except with `srun -E/--preserve-env`, where SLURM_NTASKS keeps the allocation's (`sbatch -n 4`,
    `srun -E -n 1`: NTASKS=4, STEP_NUM_TASKS=1), and only SLURM_STEP_NUM_TASKS is documented to count
    a whole heterogeneous step; hence SLURM_STEP_NUM_TASKS first.

    In the batch script itself (no srun; every task of an `sbatch --array` that runs its command
    directly, like slurm/sample_array.sbatch) Slurm sets SLURM_PROCID=0 and SLURM_NTASKS (the
    allocation's --ntasks) but no SLURM_STEP_NUM_TASKS (checked with Slurm 22.05). The batch step is
    one process, so SLURM_NTASKS is right there only with --ntasks=1: a batch script that asks for
    more tasks must start its ranks with srun, or pass the rank and world size explicitly, as
    `xtalgen sample --rank --world-size` does. The fallback to SLURM_NTASKS stays for the batch step
    with --ntasks=1, Slurm versions or launchers that set only the older variable, and hand-made
    environments.
    """
    return next((name for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if name in env), None)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name, "")
    if value == "" and default is not None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
