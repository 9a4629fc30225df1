"""A full disk during `xtalgen shard build`: one line naming the file and the space, exit code 2,
nothing half-written; the same command rerun with space resumes and gives the same bytes.

Two real faults, no mocks: a file-size limit (`ulimit -f`: the kernel fails the write with EFBIG,
which every machine can impose on a child process) and, where this user may mount one, a tmpfs
too small for the shards (ENOSPC; LMDB reports it as an I/O error, which must still read as a
full disk).
"""

from __future__ import annotations

import csv
import resource
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from xtalgen.datasets.build import BUILD_DIR

csv.field_size_limit(sys.maxsize)

# 600 Perov-5 structures: 64-record chunks of ~20 kB each, an LMDB file of ~200 kB, a tar of ~620 kB.
ROWS = 600
OVERRIDES = ["shard.split=train", "shard.chunk_size=64"]


@pytest.fixture(scope="module")
def data(perov_val, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "perov600.csv"
    with open(perov_val, newline="") as f_in, open(path, "w", newline="") as f_out:
        writer = csv.writer(f_out)
        for row in islice(csv.reader(f_in), ROWS + 1):
            writer.writerow(row)
    return path


def _build(data: Path, out: Path, fmt: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "xtalgen.cli", "shard", "build", str(data), "--out", str(out), "--format", fmt,
         "--workers", "1", "--quiet", *OVERRIDES],
        capture_output=True, text=True, timeout=600, preexec_fn=limit if file_size_limit else None,
    )


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes; the build's own state folder aside."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and BUILD_DIR not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """The same builds on a roomy disk: what a build stopped by a full disk must end up as."""
    root = tmp_path_factory.mktemp("reference")
    built = {}
    for fmt in ("lmdb", "webdataset"):
        result = _build(data, root / fmt, fmt)
        assert result.returncode == 0, result.stderr
        built[fmt] = _outputs(root / fmt)
    return built


def _assert_one_line_and_nothing_half_written(result: subprocess.CompletedProcess, out: Path, why: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"xtalgen: error: cannot write {out}/"), line  # names the file, inside OUT
    assert why in line and "free there now" in line, line
    assert line.endswith("free space there and run the same command again: it resumes from the chunks already done")
    assert not (out / "manifest.json").exists()  # no set that looks complete
    assert [p for p in out.rglob("*.tmp")] == []  # nothing temporary left taking space
    assert not (out / ".xtalgen.lock").exists()


@pytest.mark.parametrize("fmt", ["lmdb", "webdataset"])
def test_a_file_size_limit_stops_the_build_in_one_line_and_the_rerun_resumes(data, reference, tmp_path, fmt):
    out = tmp_path / "out"
    stopped = _build(data, out, fmt, file_size_limit=100_000)  # the chunks fit, a shard does not
    # LMDB passes on only "Input/output error" for a write cut short; the message says what it means.
    why = "LMDB's report of a write cut short" if fmt == "lmdb" else "File too large"
    _assert_one_line_and_nothing_half_written(stopped, out, why)
    assert "in all (" in stopped.stderr  # the space the set needs, to compare with what is free
    assert len(list((out / BUILD_DIR).glob("chunk-*.msgpack"))) == -(-ROWS // 64)  # all chunks kept
    resumed = _build(data, out, fmt)
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(out) == reference[fmt]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 320 kB tmpfs (the chunks fit, the shards do not), remountable larger; skipped where this
    user may not mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True,
                           text=True)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({tried.stderr.strip()}); the file-size-limit test covers the fault")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)

    try:
        yield mount, grow
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("fmt", ["lmdb", "webdataset"])
def test_a_full_tmpfs_stops_the_build_in_one_line_and_the_rerun_with_space_resumes(data, reference, small_tmpfs, fmt):
    mount, grow = small_tmpfs
    out = mount / "out"
    stopped = _build(data, out, fmt)
    why = "LMDB's report of a write cut short" if fmt == "lmdb" else "No space left on device"
    _assert_one_line_and_nothing_half_written(stopped, out, why)
    assert "in all (" in stopped.stderr
    grow()
    resumed = _build(data, out, fmt)
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(out) == reference[fmt]
