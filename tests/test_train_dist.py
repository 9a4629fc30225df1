"""Training engine across processes: 2-rank gloo runs under torchrun at ZeRO 0/2/3, SIGTERM preemption.

Each run is a real launcher invocation of the toy denoiser on real Perov-5 structures
(`python -m xtalgen.train.toy`), so these tests cover the launcher environment, DeepSpeed's
partitioned checkpoints and the signal path exactly as a user meets them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xtalgen.train import checkpoint as ckpt
from xtalgen.train.consolidate import consolidated_state_dict, raw_state_dict
from xtalgen.train.trainer import EXIT_PREEMPTED

COMMON = [
    "train.global_batch_structures=8", "train.micro_batch_structures=4", "train.log_every=1",
    "train.checkpoint_every=4", "train.optim.lr=3e-3", "train.optim.scheduler=constant",
    "train.wandb.enabled=false",
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def clean_env() -> dict[str, str]:
    """The environment of a fresh shell: no launcher variables left by in-process tests."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["WANDB_MODE"] = "disabled"
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toy_command(csv: Path, run_dir: Path, ranks: int, *overrides: str) -> list[str]:
    entry = ["-m", "xtalgen.train.toy", "--csv", str(csv), "--rows", "48", "--hidden", "32",
             f"train.run_dir={run_dir}", *COMMON, *overrides]
    if ranks == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={ranks}",
            f"--master_port={free_port()}", *entry]


def run_toy(csv: Path, run_dir: Path, ranks: int, *overrides: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    result = subprocess.run(toy_command(csv, run_dir, ranks, *overrides), env=clean_env() | (env or {}),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_zero3_trains_and_consolidates(perov_val, tmp_path):
    run_dir = tmp_path / "z3"
    run_toy(perov_val, run_dir, 2, "train.zero_stage=3", "train.max_steps=8", "train.ema_decay=0.0",
            env={"XTALGEN_DEBUG_INJECT_NAN_STEP": "3"})
    curve = losses(run_dir)
    assert len(curve) == 8 and sum(curve[-3:]) < sum(curve[:3])
    # rank 0's NaN at step 3 made both ranks skip that batch (a forward with no backward under ZeRO-3)
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"], e["rank"]) for e in events] == [("nonfinite_loss", 3, 0)]
    checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.saved_world_size(checkpoint) == 2
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    # EMA with decay 0 is the current weights: the gathered ZeRO-3 EMA partitions must equal
    # DeepSpeed's own fp32 consolidation of the partitioned weights, tensor for tensor.
    raw, ema = raw_state_dict(checkpoint), consolidated_state_dict(checkpoint, use_ema=True)
    assert raw.keys() == ema.keys()
    for name in raw:
        torch.testing.assert_close(ema[name], raw[name], rtol=0, atol=0, msg=name)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed" and summary["nonfinite_skips"] == 1


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(perov_val, tmp_path):
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    # Long enough that the signal always lands mid-run, even on a fast idle machine.
    steps = ["train.max_steps=60", "train.checkpoint_every=1000"]
    run_toy(perov_val, straight, 1, *steps)

    process = subprocess.Popen(toy_command(perov_val, preempted, 1, *steps), env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = preempted / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, output[-3000:]
    stopped_at = json.loads((preempted / "summary.json").read_text())["step"]
    assert 3 <= stopped_at < 60  # it finished the step in flight, then stopped
    assert ckpt.latest_checkpoint(preempted / "checkpoints").name == ckpt.tag_for_step(stopped_at)
    events = [json.loads(x) for x in (preempted / "events.jsonl").read_text().splitlines()]
    assert events[-1] == {"event": "preempted", "step": stopped_at, "signal": "SIGTERM"}

    run_toy(perov_val, preempted, 1, *steps, "train.resume=auto")
    assert losses(preempted) == losses(straight)


TINY_MODEL = [
    "model.score_net.hidden=16", "model.score_net.num_layers=1", "model.score_net.num_rbf=8",
    "model.score_net.cutoff=4.0", "model.score_net.max_neighbors=12",
]


def test_two_ranks_zero2_train_the_real_diffusion_model(perov_val, tmp_path):
    """The engine tests above run the toy denoiser; this one runs `xtalgen train` itself (the real
    CrystalDiffusion, its loader over LMDB shards) on 2 ranks at ZeRO-2, then samples the result."""
    import pandas as pd

    from xtalgen.cli import main
    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import DataConfig

    pd.read_csv(perov_val, nrows=24).to_csv(tmp_path / "perov24.csv", index=False)
    build_shards([str(tmp_path / "perov24.csv")], tmp_path / "shards", DataConfig(), fmt="lmdb", workers=1,
                 progress=False)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "xtalgen.cli", "train", "debug",
               f"data.shards={tmp_path / 'shards'}", f"train.run_dir={run_dir}", *TINY_MODEL, "train.zero_stage=2",
               "train.max_steps=5", "train.checkpoint_every=5", "train.global_batch_structures=4",
               "train.micro_batch_structures=2", "train.log_every=1", "train.ema_decay=0.0",
               "train.wandb.enabled=false"]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed" and summary["step"] == 5
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(losses(run_dir))))
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint.name == ckpt.tag_for_step(5) and ckpt.saved_world_size(checkpoint) == 2
    assert len(list(checkpoint.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # really partitioned

    # ZeRO-2 keeps whole weights on every rank; with EMA decay 0 each rank's EMA is its weights at
    # the last step, so the two ranks must hold the very same network.
    emas = [ckpt.load_rank_state(checkpoint, rank)["ema"] for rank in range(2)]
    assert not emas[0]["partitioned"] and emas[0]["shadow"].keys() == emas[1]["shadow"].keys()
    for name, value in emas[0]["shadow"].items():
        assert torch.equal(value, emas[1]["shadow"][name]), name
    # ... and DeepSpeed's fp32 master partitions, gathered, are those weights too.
    raw, ema = raw_state_dict(checkpoint), consolidated_state_dict(checkpoint, use_ema=True)
    assert raw.keys() == ema.keys()
    for name in raw:
        torch.testing.assert_close(ema[name], raw[name], rtol=0, atol=0, msg=name)

    out = tmp_path / "samples"
    assert main(["sample", str(run_dir / "checkpoints" / "latest"), "--out", str(out), "--num-samples", "2",
                 "--steps", "2", "--rank", "0", "--world-size", "1", "--no-progress"]) == 0
    assert (out / "samples.extxyz").read_text().count("Lattice=") == 2


@pytest.mark.slow
def test_zero_stages_agree_and_two_rank_resume_is_exact(perov_val, tmp_path):
    curves = {}
    for stage in (0, 2, 3):
        run_toy(perov_val, tmp_path / f"z{stage}", 2, f"train.zero_stage={stage}", "train.max_steps=6")
        curves[stage] = losses(tmp_path / f"z{stage}")
    # Same weights, data and noise on every stage: step 1 is bit-identical; later steps differ only
    # by the order of floating-point reductions of the partitioned gradients.
    assert curves[0][0] == curves[2][0] == curves[3][0]
    for stage in (2, 3):
        assert curves[stage] == pytest.approx(curves[0], rel=1e-3), stage
    assert sum(curves[2][-2:]) < sum(curves[2][:2])

    # 2 ranks, ZeRO-2: stop at step 4, resume to 6, identical to the straight run.
    split = tmp_path / "split"
    run_toy(perov_val, split, 2, "train.zero_stage=2", "train.max_steps=4")
    run_toy(perov_val, split, 2, "train.zero_stage=2", "train.max_steps=6", "train.resume=auto")
    assert losses(split) == curves[2]


def _launch_like_slurm(csv: Path, run_dir: Path, *overrides: str) -> None:
    """Two processes with the environment `srun --ntasks 2` gives its tasks (no torch launcher)."""
    entry = [sys.executable, "-m", "xtalgen.train.toy", "--csv", str(csv), "--rows", "48", "--hidden", "32",
             f"train.run_dir={run_dir}", *COMMON, *overrides]
    job_id = str(free_port())  # the rendezvous port is derived from the job id
    processes = []
    for rank in range(2):
        env = clean_env() | {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
                             "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost"}
        processes.append(subprocess.Popen(entry, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:]


@pytest.mark.slow
def test_deepspeed_launcher_and_slurm_environment_match_torchrun(perov_val, tmp_path):
    overrides = ("train.zero_stage=2", "train.max_steps=4")
    run_toy(perov_val, tmp_path / "torchrun", 2, *overrides)
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(Path(__file__).resolve().parents[1] / "train" / "toy.py"), "--csv", str(perov_val),
               "--rows", "48", "--hidden", "32", f"train.run_dir={tmp_path / 'deepspeed'}", *COMMON, *overrides]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _launch_like_slurm(perov_val, tmp_path / "slurm", *overrides)
    reference = losses(tmp_path / "torchrun")
    assert losses(tmp_path / "deepspeed") == reference
    assert losses(tmp_path / "slurm") == reference


@pytest.mark.slow
def test_sigkill_then_resume_auto_reproduces_the_straight_run(perov_val, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    steps = ["train.max_steps=60", "train.checkpoint_every=2"]
    run_toy(perov_val, straight, 1, *steps)
    process = subprocess.Popen(toy_command(perov_val, killed, 1, *steps), env=clean_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    process.kill()  # no handler runs: whatever was logged after the last checkpoint is redone
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert ckpt.latest_checkpoint(killed / "checkpoints") is not None
    run_toy(perov_val, killed, 1, *steps, "train.resume=auto")
    assert losses(killed) == losses(straight)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [2, 3])
def test_gpu_bf16_training_lowers_the_loss_and_consolidates(perov_val, tmp_path, stage):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    run_dir = tmp_path / f"gpu_z{stage}"
    run_toy(perov_val, run_dir, 1, f"train.zero_stage={stage}", "train.precision=bf16", "train.max_steps=12")
    curve = losses(run_dir)
    assert all(map(torch.isfinite, torch.tensor(curve))) and sum(curve[-3:]) < sum(curve[:3])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["device"] != "cpu"
    state = consolidated_state_dict(ckpt.latest_checkpoint(run_dir / "checkpoints"), use_ema=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --- a damaged shard met by a run --------------------------------------------------------------------
DAMAGED_RECORD = 14  # in the third of four WebDataset tars, so only the rank reading that tar meets it


@pytest.fixture(scope="module")
def damaged_shards(perov_val, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """24 Perov-5 structures as one LMDB file and as four tars, each with one byte of one record's
    value altered after the build: {format: (shard directory, damaged shard file)}."""
    import pandas as pd

    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import load_config
    from xtalgen.sharding import open_shards

    root = tmp_path_factory.mktemp("damaged")
    pd.read_csv(perov_val, nrows=24).to_csv(root / "perov24.csv", index=False)
    data = load_config([], ["data.shard.split=train", "data.shard.records_per_shard=6"]).data
    sets = {}
    for fmt in ("lmdb", "webdataset"):
        build_shards([str(root / "perov24.csv")], root / fmt, data, fmt=fmt, workers=1, progress=False)
        shards = open_shards(root / fmt)
        value, shard = shards.get_values("train", [DAMAGED_RECORD])[0], shards.shard_of("train", DAMAGED_RECORD)
        raw = bytearray((root / fmt / shard).read_bytes())
        raw[raw.find(value) + len(value) // 2] ^= 0x10
        (root / fmt / shard).write_bytes(bytes(raw))
        sets[fmt] = (root / fmt, shard)
    return sets


def _train_command(shards: Path, run_dir: Path) -> list[str]:
    return ["-m", "xtalgen.cli", "train", "debug", f"data.shards={shards}", f"train.run_dir={run_dir}", *TINY_MODEL,
            "train.max_steps=6", "train.global_batch_structures=4", "train.micro_batch_structures=2",
            "train.wandb.enabled=false"]


@pytest.mark.parametrize(("launcher", "fmt"), [
    ("one process", "webdataset"),  # tars are checked as they stream: met mid-run, at a record
    ("one process", "lmdb"),  # the LMDB file's sha256 is checked at start-up, before LMDB maps it
    ("torchrun", "webdataset"),  # one rank meets it; the other must not hang or print a traceback
    ("srun", "lmdb"),  # every rank meets it; still one line, and every rank's own exit code is 2
])
def test_a_damaged_shard_stops_training_with_one_line_and_exit_code_2(damaged_shards, tmp_path, launcher, fmt):
    from xtalgen.train.trainer import EXIT_CORRUPT_DATA

    shards, damaged = damaged_shards[fmt]
    run_dir = tmp_path / "run"
    entry = _train_command(shards, run_dir)
    if launcher == "one process":
        result = subprocess.run([sys.executable, *entry], env=clean_env(), capture_output=True, text=True, timeout=300)
        output, codes = result.stdout + result.stderr, [result.returncode]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node=2",
                   f"--master_port={free_port()}", *entry]
        result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        # torchrun itself exits 1 after any failed rank and prints its own failure summary (with a
        # traceback of its agent); the rank that failed first is reported there with its exit code.
        assert result.returncode == 1 and output.count("Traceback") == 1, output[-3000:]
        codes = [int(output.split("Root Cause")[1].split("exitcode  :")[1].split()[0])]
    else:  # the environment `srun --ntasks 2` gives its tasks: no launcher between them and us
        job = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(free_port()), "SLURM_JOB_NODELIST": "localhost"}
        processes = [subprocess.Popen([sys.executable, *entry], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=clean_env() | job | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                                      text=True) for r in range(2)]
        output = "".join(p.communicate(timeout=300)[0] for p in processes)
        codes = [p.returncode for p in processes]

    assert codes == [EXIT_CORRUPT_DATA] * len(codes), output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("xtalgen: error:")]
    key = f", key {DAMAGED_RECORD:09d}" if fmt == "webdataset" else ""
    assert errors == [f"xtalgen: error: corrupt data in shard {damaged}{key}: "
                      f"{'record crc32 mismatch (altered bytes)' if key else 'sha256 mismatch (file altered)'}; "
                      f"`xtalgen shard verify {shards}` lists every damaged shard"], output[-3000:]
    assert "[rank" not in output and (launcher == "torchrun" or "Traceback" not in output), output[-3000:]
    assert ckpt.latest_checkpoint(run_dir / "checkpoints") is None  # no checkpoint of a run that never trained
