"""Training engine, one process: config checks, schedules, EMA, exact resume, NaN guard, W&B, consolidation.

The engine is exercised through the real DeepSpeed stack with a small real model (the toy denoiser)
on real Perov-5 structures, so these tests stay fast on a CPU; the diffusion model runs in
test_train_model.py.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time

import numpy as np
import pytest
import torch

from xtalgen.schema import ConfigError, TrainConfig, load_config
from xtalgen.train import checkpoint as ckpt
from xtalgen.train.deepspeed_config import build_deepspeed_config
from xtalgen.train.ema import ExponentialMovingAverage, gather_partitions
from xtalgen.train.lr_schedule import LRSchedule
from xtalgen.train.memory_loader import InMemoryLoader
from xtalgen.train.toy import ToyDenoiser, read_csv_records
from xtalgen.train.trainer import NonFiniteLossError, Trainer

BASE = [
    "train.global_batch_structures=8", "train.micro_batch_structures=4", "train.log_every=1",
    "train.checkpoint_every=3", "train.optim.lr=3e-3", "train.optim.scheduler=constant",
    "train.wandb.enabled=false", "train.ema_decay=0.9",
]


@pytest.fixture(scope="module")
def records(perov_val):
    return read_csv_records(str(perov_val), 40)


# In-process training exports RANK/MASTER_PORT/...; later tests' subprocesses must not inherit them.
pytestmark = pytest.mark.usefixtures("restore_launcher_environment")


def make_trainer(records, run_dir, *overrides, inject_nan_at_step: int = 0) -> Trainer:
    cfg = load_config([], BASE + [f"train.run_dir={run_dir}", *overrides])
    torch.manual_seed(cfg.train.seed)
    loader = InMemoryLoader(records, cfg.train.micro_batch_structures, seed=cfg.train.seed)
    return Trainer(cfg, ToyDenoiser(hidden=32), loader, stats={"toy": True}, inject_nan_at_step=inject_nan_at_step)


def fit(records, run_dir, *overrides, inject_nan_at_step: int = 0) -> dict:
    trainer = make_trainer(records, run_dir, *overrides, inject_nan_at_step=inject_nan_at_step)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- configuration ------------------------------------------------------------------------------
def test_accumulation_keeps_the_global_batch_fixed():
    train = TrainConfig(global_batch_structures=512, micro_batch_structures=32)
    assert build_deepspeed_config(train, 1)["gradient_accumulation_steps"] == 16
    assert build_deepspeed_config(train, 16)["gradient_accumulation_steps"] == 1
    assert build_deepspeed_config(train, 4)["train_batch_size"] == 512


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.global_batch_structures=100", "train.micro_batch_structures=32"], "train.global_batch_structures"),
        (["train.zero_stage=4"], "train.zero_stage"),
        (["train.precision=fp16"], "train.precision"),
        (["train.offload_optimizer=nvme", "train.zero_stage=2"], "train.offload_nvme_path"),
        (["train.offload_param=cpu", "train.zero_stage=2"], "train.offload_param"),
        (["train.optim.scheduler=linear"], "train.optim.scheduler"),
        (["train.wandb.init_timeout_s=0"], "train.wandb.init_timeout_s"),
        (["train.debug_inject_nan_step=3"], "train.debug_inject_nan_step"),  # retired: an environment variable now
    ],
)
def test_config_errors_name_the_key(overrides, key):
    # Checked when the config loads; only the batch division, which needs the world size, later.
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")):
        build_deepspeed_config(load_config([], overrides).train, 1)


def test_unknown_or_mistyped_train_keys_are_named():
    with pytest.raises(ConfigError, match="train.max_stepz"):
        load_config([], ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config([], ["train.zero_stage=two"])


@pytest.mark.parametrize("preset", ["debug", "base", "large", "xl"])
def test_presets_build_a_deepspeed_config(preset):
    cfg = load_config([preset])
    assert cfg.model.score_net.preset == preset
    ds = build_deepspeed_config(cfg.train, 1 if preset == "debug" else 8)  # debug: one device
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert ds["train_batch_size"] == cfg.train.global_batch_structures


# --- pieces with known answers ------------------------------------------------------------------
def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_rank_state(tmp_path, 0, {"rng": ckpt.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_rank_state(tmp_path, 0)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_ema_is_the_exponential_average_of_the_weights():
    module = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(module, decay=0.5)
    start = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    ema.update()  # 0.5 * w0 + 0.5 * (w0 + 1)
    torch.testing.assert_close(ema.state_dict()["shadow"]["weight"], start + 0.5)
    with ema.swapped_in():
        torch.testing.assert_close(module.weight, start + 0.5)
    torch.testing.assert_close(module.weight, start + 1.0)  # restored after the block


def test_zero3_partitions_are_reassembled_in_rank_order():
    whole = torch.arange(7, dtype=torch.float32).reshape(7, 1)
    # DeepSpeed pads the flat tensor to world * ceil(7 / 2) = 8 and gives rank r the r-th half.
    padded = torch.cat([whole.reshape(-1), torch.zeros(1)])
    states = [{"partitioned": True, "shapes": {"w": [7, 1]}, "shadow": {"w": padded[r * 4:(r + 1) * 4]}}
              for r in range(2)]
    assert torch.equal(gather_partitions(states)["w"], whole)


def _lrs(scheduler: str, losses, **optim) -> list[float]:
    cfg = load_config([], [f"train.optim.scheduler={scheduler}", *[f"train.optim.{k}={v}" for k, v in optim.items()]])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.optim.lr)
    schedule = LRSchedule(optimizer, cfg.train.optim, max_steps=len(losses))
    seen = []
    for loss in losses:
        seen.append(optimizer.param_groups[0]["lr"])
        schedule.step(loss)
    return seen


@pytest.mark.filterwarnings("ignore:Detected call of")  # schedules stepped without optimizer steps
def test_plateau_decays_by_its_factor_after_patience():
    lrs = _lrs("plateau", [1.0] * 8, lr=1e-3, plateau_patience=2, plateau_factor=0.6, min_lr=0.0)
    # step 1 sets the best; steps 2-3 are within patience; step 4, the third without improvement,
    # exceeds it and decays the lr used from step 5 on (and the counter restarts).
    assert lrs[:4] == [1e-3] * 4
    assert lrs[4:7] == pytest.approx([6e-4] * 3)
    assert lrs[7] == pytest.approx(3.6e-4)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_cosine_warms_up_then_reaches_min_lr():
    lrs = _lrs("cosine", [1.0] * 11, lr=1e-3, warmup_steps=2, min_lr=1e-5)
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * 8 / 9)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


# --- the engine ---------------------------------------------------------------------------------
def test_stop_and_resume_reproduces_the_straight_run_exactly(records, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    fit(records, straight, "train.max_steps=14")
    first = fit(records, split, "train.max_steps=5")
    assert first["checkpoint"].endswith("step_00000005")
    second = fit(records, split, "train.max_steps=14", "train.resume=auto")
    assert second["resumed_from"].endswith("step_00000005")

    a, b = read_metrics(straight), read_metrics(split)
    assert [m["step"] for m in b] == list(range(1, 15))  # the resumed run's log continues, no gaps
    assert max(m["epoch"] for m in a) >= 1  # the stream crossed an epoch boundary
    for key in ("loss", "loss_coords", "loss_lattice", "loss_types", "lr", "grad_norm"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert a[-1]["loss"] < a[0]["loss"]
    ema_a = ckpt.load_rank_state(straight / "checkpoints" / "step_00000014", 0)["ema"]["shadow"]
    ema_b = ckpt.load_rank_state(split / "checkpoints" / "step_00000014", 0)["ema"]["shadow"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # keep_checkpoints=3 (default) prunes older ones
    assert len(ckpt.list_checkpoints(split / "checkpoints")) == 3


def test_fresh_run_refuses_a_run_dir_with_checkpoints(records, tmp_path):
    fit(records, tmp_path / "run", "train.max_steps=1")
    with pytest.raises(ConfigError, match="train.run_dir"):
        fit(records, tmp_path / "run", "train.max_steps=2")


def test_injected_nan_is_skipped_and_reported(records, tmp_path):
    summary = fit(records, tmp_path / "nan", "train.max_steps=4", inject_nan_at_step=2)
    assert summary["status"] == "completed" and summary["nonfinite_skips"] == 1
    events = [json.loads(x) for x in (tmp_path / "nan" / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "nonfinite_loss" and events[0]["step"] == 2
    assert len(events[0]["ids"]) == 4 and all(isinstance(i, str) for i in events[0]["ids"])
    metrics = read_metrics(tmp_path / "nan")
    assert all(np.isfinite(m["loss"]) for m in metrics) and metrics[-1]["nonfinite_skips"] == 1


def test_too_many_nonfinite_losses_stop_the_run(records, tmp_path):
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_skips=0"):
        fit(records, tmp_path / "nan", "train.max_steps=4", "train.max_nonfinite_skips=0", inject_nan_at_step=3)


def read_wandb_records(path) -> list:
    """Records of an offline `.wandb` file: a LevelDB-style log (7-byte file header, 32 KiB blocks,
    7-byte record headers: crc32, length, type) of `wandb_internal_pb2.Record` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    offset = 7
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # block trailer too small for a header: padding
            offset += block - offset % block
            continue
        length = int.from_bytes(data[offset + 4:offset + 6], "little")
        kind = data[offset + 6]
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            break
    return records


def _item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def test_wandb_offline_run_holds_the_logged_keys(records, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit(records, tmp_path / "wb", "train.max_steps=2", "train.wandb.enabled=true", "train.wandb.mode=auto")
    files = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    for _ in range(100):  # the W&B service process may still be flushing the file
        records = read_wandb_records(files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    history, config = {}, set()
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            history[step["_step"]] = step
        elif kind in ("run", "config"):  # the run record carries the initial config
            update = record.run.config.update if kind == "run" else record.config.update
            config |= {_item_key(item) for item in update}
    logged = read_metrics(tmp_path / "wb")
    assert sorted(history) == [m["step"] for m in logged] == [1, 2]
    for metrics in logged:
        for key in metrics.keys() - {"step"}:
            assert history[metrics["step"]][key] == pytest.approx(metrics[key]), key
    assert {"train", "model", "data"} <= config


@pytest.fixture
def silent_server():
    """A local port that accepts connections and never answers (a proxy or firewall that swallows
    traffic): only a timeout ends a request to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def _closed_port_url() -> str:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def fresh_wandb():
    """W&B reads its environment once per process (into a singleton that later changes are ignored
    by), as a training process does at its start: tear it down around a test that sets it."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


@pytest.mark.parametrize(("server", "mode"), [("silent", "auto"), ("refusing", "online"), ("refusing", "auto")])
def test_wandb_without_a_server_falls_back_to_offline_within_the_timeout(server, mode, silent_server, tmp_path,
                                                                           monkeypatch, caplog, fresh_wandb):
    from xtalgen.schema import WandbConfig
    from xtalgen.train.metrics_log import MetricsLogger

    url, accepted = silent_server if server == "silent" else (_closed_port_url(), [])
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # a key, so `auto` means online
    monkeypatch.delenv("WANDB_MODE", raising=False)
    timeout = 3.0
    started = time.monotonic()
    logger = MetricsLogger(tmp_path, True, WandbConfig(mode=mode, init_timeout_s=timeout), {"seed": 7}, "run")
    elapsed = time.monotonic() - started
    mode_used, run_id = logger.wandb_mode, logger.wandb_id
    logger.log({"step": 1, "loss": 0.25})
    logger.finish({"status": "completed"})

    assert mode_used == "offline"  # not disabled: there is something to sync
    # W&B's default would wait 90 s (and ~10 s more for an account lookup); this waits the timeout.
    assert elapsed < timeout + 8, elapsed
    if server == "silent":
        assert accepted, "the online attempt never reached the server"
        assert elapsed >= timeout, elapsed  # the server was given its time
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}")
    fallback = [r.getMessage() for r in caplog.records if r.getMessage().startswith("W&B offline")]
    assert len(fallback) == 1 and f"wandb sync {runs[0]}" in fallback[0]
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    for _ in range(100):  # the W&B service process may still be flushing the file
        kinds = [r.WhichOneof("record_type") for r in read_wandb_records(files[0])]
        if "exit" in kinds:
            break
        time.sleep(0.2)
    history = [json.loads(item.value_json) for r in read_wandb_records(files[0])
               if r.WhichOneof("record_type") == "history" for item in r.history.item if _item_key(item) == "loss"]
    assert history == [0.25] and "exit" in kinds  # a whole run on disk, as `wandb sync` needs it


def test_wandb_disabled_by_environment(records, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    fit(records, tmp_path / "off", "train.max_steps=1", "train.wandb.enabled=true")
    assert not (tmp_path / "off" / "wandb").exists()


def test_periodic_hook_cannot_disturb_the_training_stream(records, tmp_path):
    def noisy_hook(trainer, step):
        torch.rand(100), np.random.rand(10), random.random()  # draws that must not leak
        with trainer.ema_weights():
            return {"ema_norm": float(sum(p.detach().norm() for p in trainer.model.parameters()))}

    plain = fit(records, tmp_path / "plain", "train.max_steps=4")
    trainer = make_trainer(records, tmp_path / "hooked", "train.max_steps=4")
    trainer.add_periodic_hook(2, noisy_hook, name="probe")
    hooked = trainer.fit()
    trainer.close()
    assert plain["last_loss"] == hooked["last_loss"]
    lines = [json.loads(x) for x in (tmp_path / "hooked" / "hooks.jsonl").read_text().splitlines()]
    assert [(x["step"], x["hook"]) for x in lines] == [(2, "probe"), (4, "probe")]


def test_consolidated_ema_equals_the_weights_when_decay_is_zero(records, tmp_path):
    from xtalgen.train.consolidate import consolidated_state_dict, raw_state_dict

    fit(records, tmp_path / "c", "train.max_steps=3", "train.ema_decay=0.0")
    checkpoint = ckpt.latest_checkpoint(tmp_path / "c" / "checkpoints")
    raw = raw_state_dict(checkpoint)
    ema = consolidated_state_dict(checkpoint, use_ema=True)
    assert raw.keys() == ema.keys() == ToyDenoiser(hidden=32).state_dict().keys()
    assert all(torch.equal(raw[k], ema[k]) for k in raw)
    ToyDenoiser(hidden=32).load_state_dict(ema, strict=True)


def test_bf16_run_resumes_exactly(records, tmp_path):
    bf16 = ["train.precision=bf16", "train.zero_stage=1"]
    fit(records, tmp_path / "a", "train.max_steps=4", *bf16)
    fit(records, tmp_path / "b", "train.max_steps=2", *bf16)
    fit(records, tmp_path / "b", "train.max_steps=4", "train.resume=auto", *bf16)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in a)


# --- launchers ----------------------------------------------------------------------------------
def test_launcher_environment_from_torchrun_slurm_and_plain_python():
    from xtalgen.train.distributed import launcher_environment

    torchrun = launcher_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                     "MASTER_ADDR": "node7", "MASTER_PORT": "29400"})
    assert torchrun == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                        "MASTER_PORT": "29400"}
    # srun: one task per process; without scontrol, a single-host nodelist is the host itself.
    slurm = launcher_environment({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                  "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu001", "PATH": ""})
    assert (slurm["RANK"], slurm["WORLD_SIZE"], slurm["LOCAL_RANK"]) == ("5", "16", "1")
    assert slurm["MASTER_ADDR"] == "gpu001" and slurm["MASTER_PORT"] == str(29500 + 4242)
    # torchrun inside an srun task wins over Slurm's per-task numbers
    nested = launcher_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "9", "WORLD_SIZE": "16"})
    assert (nested["RANK"], nested["WORLD_SIZE"]) == ("9", "16")
    alone = launcher_environment({})
    assert (alone["RANK"], alone["WORLD_SIZE"], alone["LOCAL_RANK"]) == ("0", "1", "0")
    assert 0 < int(alone["MASTER_PORT"]) < 65536


def test_a_failing_wandb_never_stops_training(records, tmp_path, monkeypatch, caplog):
    import wandb

    def unreachable(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", unreachable)
    summary = fit(records, tmp_path / "wb", "train.max_steps=2", "train.wandb.enabled=true")
    assert summary["status"] == "completed" and len(read_metrics(tmp_path / "wb")) == 2
    assert "W&B disabled" in caplog.text and "unreachable" in caplog.text
