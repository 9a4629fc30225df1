"""The test suite's own guard: under CI, missing shared data fails the run instead of skipping most of it."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT, SHARED_DATA

# A test that needs the shared data (through the `perov_val` fixture) and is cheap once it has it.
NEEDS_DATA = "tests/test_readers.py::test_readers_stream"


def _pytest(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "XTALGEN_SHARED_DATA", "PYTEST_ADDOPTS")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=REPO_ROOT, env={**base, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)


def test_ci_without_shared_data_is_an_error_not_a_green_run_of_skips(tmp_path):
    fake = tmp_path / "shared" / "data"
    ci = _pytest(NEEDS_DATA, CI="true", XTALGEN_SHARED_DATA=str(fake))
    output = ci.stdout + ci.stderr
    assert ci.returncode == 4, output  # pytest's usage error: nothing ran
    assert "CI is set but the shared test data is missing" in output and str(fake) in output
    assert "passed" not in output and "skipped" not in output

    # Outside CI (here CI=false, as some shells export it) the same run skips that test, saying why.
    local = _pytest(NEEDS_DATA, CI="false", XTALGEN_SHARED_DATA=str(fake))
    assert local.returncode == 0, local.stdout + local.stderr
    assert "1 skipped" in local.stdout and f"shared data not found at {fake}" in local.stdout


def test_ci_with_the_shared_data_runs_the_tests(shared_data):
    ci = _pytest(NEEDS_DATA, CI="true", XTALGEN_SHARED_DATA=str(SHARED_DATA))
    assert ci.returncode == 0 and "1 passed" in ci.stdout, ci.stdout + ci.stderr
