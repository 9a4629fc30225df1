"""Which structures a sampling request makes, in which batch, with which seed, on which rank.

Everything here is a pure function of the request, never of the machine: batch b always holds the same
sample indices and draws from its own generator seeded by (base seed, b). So a structure is the same
whether it was made on rank 0 of 1 or rank 3 of 8, in the first run or in a resumed one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from xtalgen.launcher import launch_env

# Independent random streams of one batch: the diffusion noise (on the model's device) and the draw of
# atom counts from the histogram (always on CPU, so the counts do not depend on the device).
NOISE_STREAM = 0
NUM_ATOMS_STREAM = 1
CONDITION_STREAM = 2  # per-structure targets drawn for a range condition
TEMPLATE_STREAM = 3  # the symmetry template of each structure (`--space-group`)

ID_PREFIX = "sample-"  # non-numeric, so extxyz readers keep ids as strings ("000012" would become 12)


@dataclass(frozen=True)
class SamplingPlan:
    num_samples: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def id_width(self) -> int:
        # Zero padding wide enough for every index, so ordering by id is ordering by index.
        return max(6, len(str(self.num_samples - 1)))

    def batch_indices(self, batch: int) -> range:
        """Global sample indices made by `batch` (the last batch may be short)."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} outside 0..{self.num_batches - 1}")
        start = batch * self.batch_size
        return range(start, min(start + self.batch_size, self.num_samples))

    def sample_id(self, index: int) -> str:
        return f"{ID_PREFIX}{index:0{self.id_width}d}"

    def batch_ids(self, batch: int) -> list[str]:
        return [self.sample_id(i) for i in self.batch_indices(batch)]

    def batches_for_rank(self, rank: int, world_size: int) -> list[int]:
        """Round-robin assignment: rank r takes batches r, r + W, r + 2W, ..."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        return list(range(rank, self.num_batches, world_size))

    def batch_seed(self, batch: int, stream: int = NOISE_STREAM) -> int:
        return batch_seed(self.seed, batch, stream)

    def generator(self, batch: int, stream: int = NOISE_STREAM,
                  device: torch.device | str = "cpu") -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(self.batch_seed(batch, stream))
        return gen


def batch_seed(base_seed: int, batch: int, stream: int = NOISE_STREAM) -> int:
    """A 63-bit seed for one stream of one batch, from numpy's SeedSequence.

    SeedSequence spawn keys are the documented way to derive independent streams from one seed;
    a naive `seed + batch` would make run (seed=0, batch 1) repeat run (seed=1, batch 0).
    """
    key = (int(batch), int(stream))
    state = np.random.SeedSequence(entropy=int(base_seed), spawn_key=key).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def rank_from_env(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) of this process among all samplers of one request.

    Processes of one launch, as `xtalgen.launcher` reads them for training too: torchrun
    (RANK/WORLD_SIZE) or srun (SLURM_PROCID with SLURM_STEP_NUM_TASKS, else SLURM_NTASKS); else
    (0, 1). Inside a Slurm job array each array element is one more block of such ranks, so element
    k of K with W tasks each holds ranks k*W .. k*W + W-1 of K*W (elements are numbered by
    SLURM_ARRAY_TASK_MIN/STEP, so `--array=0-30:3` works too).
    """
    env = os.environ if environ is None else environ
    launch = launch_env(env)
    rank, world = launch.rank, launch.world_size
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        element = (int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))) // step
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if not 0 <= element < count:
            raise ValueError(f"Slurm array element {element} is outside 0..{count - 1}")
        rank, world = element * world + rank, count * world
    return rank, world
