"""xtalgen.launcher: rank, world size and local rank from the launcher's environment variables.

One table of environments, read through os.environ (monkeypatched) the way every command reads it;
training (`launcher_environment`) and sampling (`rank_from_env`, `default_device`) must agree on it.
"""

from __future__ import annotations

import os

import pytest
import torch

from xtalgen.launcher import SINGLE, SLURM, TORCHRUN, LaunchEnv, launch_env

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# (what it is, environment) -> (rank, world_size, local_rank, launcher)
CASES = [
    ("plain python", {}, (0, 1, 0, SINGLE)),
    ("torchrun", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1, TORCHRUN)),
    ("RANK/WORLD_SIZE by hand, no LOCAL_RANK", {"RANK": "1", "WORLD_SIZE": "2"}, (1, 2, 0, TORCHRUN)),
    ("RANK without WORLD_SIZE is no launch", {"RANK": "1"}, (0, 1, 0, SINGLE)),
    ("a stray LOCAL_RANK is no launch", {"LOCAL_RANK": "2"}, (0, 1, 0, SINGLE)),
    ("srun, one task per GPU on 4 nodes",
     {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"},
     (5, 16, 1, SLURM)),
    # `sbatch -n 8` then `srun -E -n 2`: SLURM_NTASKS keeps the allocation's 8, the step has 2 tasks.
    ("srun -E inside a larger allocation",
     {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"},
     (1, 2, 1, SLURM)),
    ("one-task srun step of a 4-task allocation",
     {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"},
     (0, 1, 0, SLURM)),
    ("only SLURM_NTASKS (no step count)", {"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, (2, 3, 0, SLURM)),
    ("only SLURM_STEP_NUM_TASKS", {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}, (1, 2, 0, SLURM)),
    # The batch step of a `--ntasks=1` array task (slurm/sample_array.sbatch): no SLURM_STEP_NUM_TASKS.
    ("array task's batch step, --ntasks=1",
     {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_ARRAY_TASK_ID": "3"},
     (0, 1, 0, SLURM)),
    ("SLURM_PROCID without a task count is no launch", {"SLURM_PROCID": "0"}, (0, 1, 0, SINGLE)),
    ("torchrun inside an srun task wins over Slurm",
     {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"},
     (9, 16, 3, TORCHRUN)),
    ("torchrun wins over an enclosing batch step",
     {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (0, 2, 0, TORCHRUN)),
    ("empty SLURM_LOCALID", {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": ""}, (0, 1, 0, SLURM)),
]
IDS = [case[0] for case in CASES]


@pytest.fixture
def environ(monkeypatch):
    """A setter for a clean launch environment: no torch launcher or Slurm variables but the given ones."""
    for name in list(os.environ):
        if name in TORCH_VARS or name.startswith("SLURM_"):
            monkeypatch.delenv(name)

    def set_env(values: dict[str, str]) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.parametrize(("what", "env", "expected"), CASES, ids=IDS)
def test_launch_env_from_the_environment(environ, what, env, expected):
    environ(env)
    rank, world_size, local_rank, launcher = expected
    assert launch_env() == LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank, launcher=launcher)
    assert launch_env(dict(env)) == launch_env()  # an explicit mapping reads the same


@pytest.mark.parametrize(("what", "env", "expected"), CASES, ids=IDS)
def test_training_and_sampling_agree(environ, monkeypatch, what, env, expected):
    from xtalgen.sampling.driver import default_device
    from xtalgen.sampling.plan import rank_from_env
    from xtalgen.train.distributed import launcher_environment

    environ(env)
    rank, world_size, local_rank, _ = expected
    trained = launcher_environment()
    assert (trained["RANK"], trained["WORLD_SIZE"], trained["LOCAL_RANK"]) == (str(rank), str(world_size),
                                                                               str(local_rank))
    if "SLURM_ARRAY_TASK_ID" not in env:  # sampling alone counts array elements as blocks of ranks
        assert rank_from_env() == (rank, world_size)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda", local_rank)


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "3", "WORLD_SIZE": "2"}, r"RANK=3 is outside 0\.\.1 \(WORLD_SIZE=2\)"),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"},
     r"SLURM_PROCID=2 is outside 0\.\.1 \(SLURM_STEP_NUM_TASKS=2\)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "outside"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "x"}, "SLURM_LOCALID='x' is not an integer"),
])
def test_inconsistent_environments_are_refused(environ, env, message):
    environ(env)
    with pytest.raises(ValueError, match=message):
        launch_env()
