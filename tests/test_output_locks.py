"""One writer per output: `shard build`, `train`, `sample` and `evaluate` each hold a lock on what
they write (`xtalgen.dirlock`); a second writer is refused at once in one line naming the holder,
exit code 2, having written nothing; a lock left by a killed process is taken over.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest

from xtalgen.datasets.build import build_shards
from xtalgen.dirlock import LOCK_NAME, DirectoryLock, OutputInUseError
from xtalgen.schema import DataConfig
from xtalgen.sharding import read_manifest

csv.field_size_limit(sys.maxsize)

TINY_MODEL = ["model.score_net.hidden=16", "model.score_net.num_layers=1", "model.score_net.num_rbf=8",
              "model.score_net.cutoff=4.0", "model.score_net.max_neighbors=12"]

HOLDER = """
import sys, time
from xtalgen.dirlock import DirectoryLock
DirectoryLock(sys.argv[1], name=sys.argv[2], command="lock-holder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return env | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _xtalgen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xtalgen.cli", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Holder:
    """A separate live process holding `directory`'s lock (file `name`) until `kill`."""

    def __init__(self, directory: Path, name: str = LOCK_NAME):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), name], env=_env(),
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"
        self.pid = self.process.pid

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def holder():
    holders: list[Holder] = []

    def start(directory: Path, name: str = LOCK_NAME) -> Holder:
        holders.append(Holder(directory, name))
        return holders[-1]

    yield start
    for h in holders:
        if h.process.poll() is None:
            h.kill()


def _refusal(stderr: str, directory: Path, pid: int) -> None:
    """Exactly one line, naming the directory and the holder's pid and host, no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"xtalgen: error: {directory} is in use by pid {pid} on {socket.gethostname()}"), stderr


def _csv(src: Path, dst: Path, n: int, copies: int = 1) -> Path:
    """The first n rows of src, `copies` times over (the repeats are rejected as duplicate ids)."""
    with open(src, newline="") as f_in:
        header, *rows = list(islice(csv.reader(f_in), n + 1))
    with open(dst, "w", newline="") as f_out:
        csv.writer(f_out).writerows([header, *rows * copies])
    return dst


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _wait_for_lock_holder(process: subprocess.Popen, lock: Path, timeout_s: float = 120.0) -> None:
    """Until `process` holds `lock` (its pid is in the lock file's record)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first build ended before it could be seen holding the lock"
        try:
            if json.loads(lock.read_text()).get("pid") == process.pid:
                return
        except (OSError, ValueError):  # not there yet, or being written
            pass
        time.sleep(0.005)
    raise AssertionError("the first build never took the lock")


@pytest.mark.parametrize("fmt", ["lmdb", "webdataset"])
def test_two_builds_into_one_output_exactly_one_builds_and_it_verifies(perov_val, tmp_path, fmt):
    """Two real builds into one --out. The first is paused (SIGSTOP) once it holds the lock, so the
    second surely starts while the first is mid-build, however loaded the machine; then it resumes."""
    # 12,000 rows (1,500 structures, each 8 times): seconds of holding the lock, so the first build is
    # seen holding it even when this process is descheduled for a while on a loaded machine.
    data = _csv(perov_val, tmp_path / "perov.csv", 1500, copies=8)
    out = tmp_path / "out"
    build = ["shard", "build", str(data), "--out", str(out), "--format", fmt, "--workers", "1", "--quiet",
             "shard.split=train"]
    first = _xtalgen(*build)
    try:
        _wait_for_lock_holder(first, out / LOCK_NAME)
        first.send_signal(signal.SIGSTOP)
        second = _xtalgen(*build)
        _, refused_err = second.communicate(timeout=600)
    finally:
        first.send_signal(signal.SIGCONT)
    winner_out, winner_err = first.communicate(timeout=600)
    assert (first.returncode, second.returncode) == (0, 2), (winner_err[-2000:], refused_err[-2000:])
    _refusal(refused_err, out, first.pid)
    assert "xtalgen shard build" in refused_err  # the holder's command, as its user typed it
    verify = _xtalgen("shard", "verify", str(out))
    assert verify.wait(timeout=300) == 0, verify.communicate()
    accepted = int(winner_out.split(" = accepted ")[1].split()[0])
    assert winner_out.startswith("read 12000 = ") and read_manifest(out)["num_records"] == accepted > 1400
    assert not (out / LOCK_NAME).exists()  # released: a finished set carries nothing extra


def test_a_held_output_is_refused_before_anything_is_written(perov_val, tmp_path, holder):
    out = tmp_path / "out"
    h = holder(out)
    before = _files(out)
    with pytest.raises(OutputInUseError, match=f"pid {h.pid} on "):
        build_shards([str(_csv(perov_val, tmp_path / "p.csv", 20))], out, DataConfig(), fmt="lmdb", workers=1,
                     progress=False)
    assert _files(out) == before  # the holder's lock file only: no .build, no shards, no manifest


def test_a_lock_left_by_a_killed_build_is_taken_over(perov_val, tmp_path, holder):
    out = tmp_path / "out"
    h = holder(out)
    h.kill()  # as a crash would: the kernel drops its flock, the lock file with its record stays
    assert (out / LOCK_NAME).exists()
    build = _xtalgen("shard", "build", str(_csv(perov_val, tmp_path / "p.csv", 20)), "--out", str(out), "--quiet")
    stdout, stderr = build.communicate(timeout=300)
    assert build.returncode == 0, stderr
    assert f"was locked by pid {h.pid} on" in stderr and "taking it over" in stderr, stderr
    assert not (out / LOCK_NAME).exists()


def test_one_process_may_take_its_own_lock_again():
    """build_shards holds the lock and the ShardSetWriter it drives takes it too."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        outer = DirectoryLock(folder).acquire()
        inner = DirectoryLock(folder).acquire()
        inner.release()
        assert (Path(folder) / LOCK_NAME).exists()  # still held by the outer holder
        outer.release()
        assert not (Path(folder) / LOCK_NAME).exists()


def test_train_refuses_a_run_directory_in_use(perov_val, tmp_path, holder):
    shards = tmp_path / "shards"
    data = DataConfig()
    data.shard.split = "train"
    build_shards([str(_csv(perov_val, tmp_path / "p.csv", 24))], shards, data, fmt="lmdb", workers=1, progress=False)
    run_dir = tmp_path / "run"
    h = holder(run_dir)
    train = _xtalgen("train", "debug", f"data.shards={shards}", f"train.run_dir={run_dir}", "train.max_steps=2",
                     "train.global_batch_structures=2", "train.micro_batch_structures=2",
                     "train.wandb.enabled=false", *TINY_MODEL)
    _, stderr = train.communicate(timeout=300)
    assert train.returncode == 2, stderr[-3000:]
    _refusal("\n".join(line for line in stderr.splitlines() if line.startswith("xtalgen")), run_dir, h.pid)
    assert "Traceback" not in stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # no config.yaml, no checkpoint


def test_sample_refuses_an_output_whose_rank_is_in_use(tmp_path, holder):
    import torch

    from xtalgen.models.diffusion import build_model
    from xtalgen.models.io import save_model
    from xtalgen.schema import ModelConfig, ScoreNetConfig

    stats = {"mean_density": 0.05, "num_atoms_histogram": {4: 1}}
    cfg = ModelConfig(score_net=ScoreNetConfig(preset="debug"))
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    save_model(model, build_model(cfg, stats), cfg, stats)
    out = tmp_path / "samples"
    h = holder(out, ".xtalgen-sample-rank0.lock")
    sample = _xtalgen("sample", str(model), "--out", str(out), "--num-samples", "2", "--steps", "2",
                      "--no-progress", "sample.corrector_steps=0")
    _, stderr = sample.communicate(timeout=300)
    assert sample.returncode == 2
    _refusal(stderr, out, h.pid)
    assert sorted(p.name for p in out.iterdir()) == [".xtalgen-sample-rank0.lock"]
    # Rank 1 of the same folder is not blocked by rank 0's writer (the ranks of one run share it).
    other = _xtalgen("sample", str(model), "--out", str(tmp_path / "free"), "--num-samples", "2", "--steps", "2",
                     "--no-progress", "sample.corrector_steps=0")
    assert other.wait(timeout=300) == 0


def test_evaluate_refuses_an_output_in_use(perov_val, tmp_path, holder):
    with open(perov_val, newline="") as f:
        row = next(islice(csv.DictReader(f), 1))
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    (cifs / "a.cif").write_text(row["cif"])
    out = tmp_path / "eval"
    h = holder(out)
    evaluate = _xtalgen("evaluate", str(cifs), "--out", str(out), "--no-relax", "--no-plots", "--no-progress")
    _, stderr = evaluate.communicate(timeout=300)
    assert evaluate.returncode == 2
    _refusal(stderr, out, h.pid)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
