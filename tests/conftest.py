"""Shared fixtures. Tests read real data from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("XTALGEN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Keep W&B off the network and out of the user's account in every test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The Triton kernels run in Triton's interpreter on CPU (the parity tests of the fused backend).
# Triton reads this once, when it is imported, so it is set before any test imports it; a GPU run
# (`make test-gpu`) sets XTALGEN_TRITON_COMPILED=1 to run the compiled kernels instead.
if os.environ.get("XTALGEN_TRITON_COMPILED", "") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_configure(config) -> None:
    """Most test files need the shared data and skip without it: a green run that tested little.
    On a developer's machine that is a choice; under CI it is a broken setup, so stop loudly."""
    if running_in_ci() and not SHARED_DATA.is_dir():
        raise pytest.UsageError(
            f"CI is set but the shared test data is missing at {SHARED_DATA} (expected ../shared/data beside "
            "the repository, or XTALGEN_SHARED_DATA); most tests would skip and the run would look green"
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def perov_val(shared_data) -> Path:
    return shared_data / "perov_5" / "val.csv"


@pytest.fixture(scope="session")
def carbon_val(shared_data) -> Path:
    return shared_data / "carbon_24" / "val.csv"


@pytest.fixture(scope="module")
def restore_launcher_environment():
    """Put back RANK/WORLD_SIZE/MASTER_* after a module that trains in-process (which exports them)."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
