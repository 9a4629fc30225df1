"""The training engine: one DeepSpeed loop for every model with `loss(batch) -> dict[str, Tensor]`.

The whole step, in order (`Trainer._train_step`):

    for each of the `accumulation` micro-batches:
        next batch; if any rank met a damaged record, every rank stops here (`stop_together`)
        batch -> device; forward under autocast (bf16) -> loss dict
        all-reduce a non-finite flag; if any rank's loss is NaN/inf, every rank skips this batch
        engine.backward(loss); engine.step()   # DeepSpeed reduces, clips and steps at the boundary
    EMA update; all-reduce the loss terms, counts and a stop flag; LR schedule on the loss average
    log (metrics.jsonl, W&B); periodic hooks; checkpoint; on SIGTERM/SIGUSR1: checkpoint, exit 75

Anything random draws from torch's global generator (seeded per rank) and the loader's own seeded
stream; both are in the checkpoint, so a resumed run reproduces the uninterrupted run's losses
exactly on the same number of ranks.

The trainer wires components that each do one thing: the DeepSpeed engine and everything else that
touches DeepSpeed (`parallelize`), the LR schedule (`lr_schedule`), the loss average and run logs
(`metrics_log`), the EMA (`ema`), and the checkpoint manager (`checkpoint.CheckpointManager`), which
saves and restores every component that has a `state_dict`, the trainer's own counters included.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import random
import resource
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from xtalgen.batch import CrystalBatch
from xtalgen.dirlock import DirectoryLock, OutputInUseError
from xtalgen.schema import Config, ConfigError, save_config
from xtalgen.sharding.codec import ShardCorruptionError
from xtalgen.sharding.remote import is_remote, shard_location
from xtalgen.train import checkpoint as ckpt
from xtalgen.train import parallelize
from xtalgen.train.deepspeed_config import build_deepspeed_config
from xtalgen.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, stop_together
from xtalgen.train.ema import ExponentialMovingAverage
from xtalgen.train.lr_schedule import LRSchedule
from xtalgen.train.metrics_log import LossAverage, MetricsLogger

log = logging.getLogger("xtalgen.train")
# DeepSpeed calls torch.distributed functions that torch now marks deprecated, once per step.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

EXIT_OK = 0
EXIT_CORRUPT_DATA = 2  # a damaged shard: bad input, like a config error; rerunning will not help
EXIT_RUN_DIR_IN_USE = 2  # another live run holds train.run_dir: bad input too, refused before any write
EXIT_NONFINITE = 3  # too many non-finite losses: the run stopped, do not requeue blindly
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; requeue to continue

PeriodicHook = Callable[["Trainer", int], "dict[str, Any] | None"]

# Test hook, read here only: rank 0's loss at this step (1-based) becomes NaN; unset or 0 = off.
INJECT_NAN_ENV = "XTALGEN_DEBUG_INJECT_NAN_STEP"


class NonFiniteLossError(RuntimeError):
    """Raised when more batches than `train.max_nonfinite_skips` gave a NaN/inf loss."""


def injected_nan_step(environ: dict[str, str] | None = None) -> int:
    """The step at which rank 0's loss is made NaN (tests of the non-finite guard); 0 = never."""
    raw = (os.environ if environ is None else environ).get(INJECT_NAN_ENV, "").strip()
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"{INJECT_NAN_ENV}={raw!r} is not a step number") from None


@dataclass
class TrainCounters:
    """The trainer's own progress: a checkpointed component like the loader or the EMA (its
    entries sit at the top level of each rank's trainer-state file)."""

    step: int = 0
    epoch: int = 0
    nonfinite_skips: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    loss_keys: list[str] | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.nonfinite_skips = int(state["nonfinite_skips"])
        self.first_loss, self.loss_keys = state["first_loss"], state["loss_keys"]
        self.last_loss = state.get("last_loss")


class Throughput:
    """Structures and atoms per second over the steps since the last `reset`."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.structures, self.atoms = time.perf_counter(), 0.0, 0.0

    def add(self, result: dict[str, float]) -> None:
        self.structures += result["structures"]
        self.atoms += result["atoms"]

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"structures_per_s": self.structures / elapsed, "atoms_per_s": self.atoms / elapsed}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """One DeepSpeed loop for every model with `loss(batch) -> dict[str, Tensor]`.

    `cfg` is checked when it loads (`xtalgen.schema.load_config`). `inject_nan_at_step`: rank 0's
    loss at that step becomes NaN, once (tests of the non-finite guard); None reads
    $XTALGEN_DEBUG_INJECT_NAN_STEP, 0 is off.
    """

    def __init__(self, cfg: Config, model: nn.Module, loader, *, dist_info: DistInfo | None = None,
                 stats: dict | None = None, run_info: dict | None = None, inject_nan_at_step: int | None = None):
        self.cfg, self.tc = cfg, cfg.train
        self.dist = dist_info or init_distributed()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.dist.is_main
        self.device = self.dist.device
        self.run_dir = Path(self.tc.run_dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.ds_config = build_deepspeed_config(self.tc, self.world_size)
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])
        self.model, self.loader, self.stats = model, loader, dict(stats or {})
        self.run_info = dict(run_info or {})  # extra run.json entries (fine-tuning: the base model)

        # Initial weights must already be identical on all ranks (the caller seeds before building
        # the model); from here on each rank draws its own noise.
        self._seed_everything(self.tc.seed + self.rank)
        if self.tc.activation_checkpointing:
            parallelize.apply_activation_checkpointing(model)
        self.engine, self.optimizer = parallelize.build_engine(model, self.tc.optim, self.ds_config)
        self.ema = ExponentialMovingAverage(self.engine.module, self.tc.ema_decay)
        self.schedule = LRSchedule(self.optimizer, self.tc.optim, self.tc.max_steps)
        self.loss_average = LossAverage()
        self.counters = TrainCounters()
        # Restored in this order on resume; the RNG last, so that nothing drawn before it counts.
        self.checkpoints = ckpt.CheckpointManager(
            self.checkpoint_root, self.engine, self.counters,
            {"loader": self.loader, "ema": self.ema, "schedule": self.schedule,
             "loss_average": self.loss_average, "rng": ckpt.RNGState()},
            rank=self.rank, world_size=self.world_size, keep=self.tc.keep_checkpoints,
        )

        self.last_checkpoint: Path | None = None
        self.hooks: list[tuple[int, PeriodicHook, str]] = []
        self._stop_signal: str | None = None
        self._inject_nan_at = injected_nan_step() if inject_nan_at_step is None else int(inject_nan_at_step)
        self._nan_injected = False
        self._previous_handlers: dict[int, Any] = {}
        self.metrics: MetricsLogger | None = None
        self._run_lock: DirectoryLock | None = None

    # --- setup -------------------------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def step(self) -> int:
        """Optimizer steps taken (restored on resume)."""
        return self.counters.step

    def add_periodic_hook(self, every: int, fn: PeriodicHook, name: str | None = None) -> None:
        """Call `fn(trainer, step)` every `every` steps on every rank (e.g. periodic sampling).

        The hook runs with the training RNG state saved and restored around it, so it cannot
        change the training stream; a returned dict is logged (rank 0) to hooks.jsonl and W&B.
        Use `trainer.ema_weights()` inside it to evaluate the averaged model.
        """
        if every <= 0:
            raise ValueError(f"hook period must be > 0, got {every}")
        self.hooks.append((every, fn, name or getattr(fn, "__name__", "hook")))

    def ema_weights(self):
        """Context manager: the module holds the EMA weights inside the block."""
        return self.ema.swapped_in()

    def _lock_run_dir(self) -> None:
        """Rank 0 holds the run directory's lock until `close`: a second run into the same directory
        would interleave checkpoints and metrics with this one's, so it is refused at once
        (OutputInUseError, raised on rank 0; every other rank stops with StoppedByPeer)."""
        error = None
        if self.is_main and self._run_lock is None:
            try:
                self._run_lock = DirectoryLock(self.run_dir).acquire()
            except OutputInUseError as exc:
                error = exc
        stop_together(error)

    def _prepare_run_dir(self, resuming: bool) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # resume=auto with no complete checkpoint (killed during the first save) starts afresh.
            if not resuming and self.tc.resume in ("", "none") and ckpt.list_checkpoints(self.checkpoint_root):
                raise ConfigError(
                    f"config key 'train.run_dir': {self.run_dir} already holds checkpoints; "
                    "set train.resume=auto to continue it or choose a new train.run_dir"
                )
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        barrier()

    def _write_run_info(self) -> None:
        if not self.is_main:
            return
        manifest, manifest_hash = self._manifest_identity()
        info_path = self.run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if info.get("manifest_hash") and manifest_hash and info["manifest_hash"] != manifest_hash:
            log.warning("the shards' manifest changed since this run started (%s): the data stream "
                        "will not match the interrupted run", manifest)
        info.update(
            manifest_path=manifest,
            manifest_hash=manifest_hash,
            stats=self.stats,
            world_size=self.world_size,
            zero_stage=self.tc.zero_stage,
            precision=self.tc.precision,
            gradient_accumulation_steps=self.accumulation,
            device=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            wandb_id=self.metrics.wandb_id if self.metrics else None,
            versions={"torch": torch.__version__, "deepspeed": parallelize.deepspeed_version(),
                      "python": platform.python_version()},
            **self.run_info,
        )
        info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    def _manifest_identity(self) -> tuple[str | None, str | None]:
        """(where `manifest.json` is, its sha256) for run.json. A set behind a URL or a `pipe:`
        command is identified by the manifest bytes its loader fetched (`Path` would mangle a URL)."""
        shards = self.cfg.data.shards
        if not shards:
            return None, None
        if is_remote(shards):
            fetched = getattr(getattr(self.loader, "shards", None), "manifest_sha256", None)
            return shard_location(shards).describe("manifest.json"), fetched
        manifest = Path(shards) / "manifest.json"
        return str(manifest), sha256_file(manifest) if manifest.exists() else None

    def _previous_wandb_id(self) -> str | None:
        info_path = self.run_dir / "run.json"
        return json.loads(info_path.read_text()).get("wandb_id") if info_path.exists() else None

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Every component's state and DeepSpeed's files for the current step (`checkpoint.py`)."""
        self.last_checkpoint = self.checkpoints.save()
        return self.last_checkpoint

    def _resume(self) -> Path | None:
        source = ckpt.resolve_checkpoint(self.tc.resume, self.run_dir)
        if source is None:
            return None
        self.checkpoints.load(source)
        self.last_checkpoint = source
        return source

    # --- signals -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        self._stop_signal = signal.Signals(signum).name

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    # --- the step ----------------------------------------------------------------------------
    def _batches(self) -> Iterator[CrystalBatch]:
        """Endless stream over epochs; the loader's state says where in the epoch we are."""
        empty_epochs = 0
        while True:
            self.loader.set_epoch(self.counters.epoch)
            produced = False
            for batch in self.loader:
                produced = True
                yield batch
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs > 1:
                raise RuntimeError("the loader produced no batches for this rank: too little data "
                                   f"for {self.world_size} ranks, or an empty split")
            self.counters.epoch += 1

    def _autocast(self):
        if self.tc.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _finite_forward(self, data: Iterator[CrystalBatch]) -> tuple[CrystalBatch, dict]:
        """Forward the next batch whose loss is finite on every rank; skipped batches are recorded."""
        while True:
            batch = self._next_batch(data).to(self.device, dtype=torch.float32)
            with self._autocast():
                out = self.engine(batch)
            if self._should_inject_nan():
                out["loss"] = out["loss"] * float("nan")
            local_bad = not bool(torch.isfinite(out["loss"].detach()).item())
            bad_ranks = int(all_reduce_sum(torch.tensor([float(local_bad)], dtype=torch.float64)).item())
            if bad_ranks == 0:
                return batch, out
            del out  # drop the graph: this batch never reaches backward
            self._record_nonfinite(batch, local_bad, bad_ranks)

    def _next_batch(self, data: Iterator[CrystalBatch]) -> CrystalBatch:
        """The next batch; a damaged record stops every rank here, before the forward.

        Ranks read different records, so only some meet the damage. Without agreeing first, the
        others would enter the forward's or the loss check's collectives and wait for a rank that
        has gone. One small all-reduce per micro-batch (with several ranks) buys a clean stop.
        """
        try:
            batch, error = next(data), None
        except ShardCorruptionError as exc:
            batch, error = None, exc
        if self.world_size > 1 or error is not None:
            stop_together(error)
        return batch

    def _should_inject_nan(self) -> bool:
        if self._inject_nan_at != self.step + 1 or self.rank != 0 or self._nan_injected:
            return False
        self._nan_injected = True
        return True

    def _record_nonfinite(self, batch: CrystalBatch, local_bad: bool, bad_ranks: int) -> None:
        self.counters.nonfinite_skips += 1
        skips = self.counters.nonfinite_skips
        if local_bad:
            log.warning("rank %d: non-finite loss at step %d, batch skipped on every rank; ids: %s",
                        self.rank, self.step + 1, ", ".join(batch.ids))
            if self.metrics is not None:
                self.metrics.event({"event": "nonfinite_loss", "step": self.step + 1, "rank": self.rank,
                                    "ranks_affected": bad_ranks, "ids": list(batch.ids),
                                    "skips_so_far": skips})
        if skips > self.tc.max_nonfinite_skips:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1}: {skips} batches skipped, more "
                f"than train.max_nonfinite_skips={self.tc.max_nonfinite_skips}. The run stopped without "
                f"training on them; the last good checkpoint is {self.last_checkpoint}. Offending batch "
                f"ids are in {self.run_dir / 'events.jsonl'}"
            )

    def _train_step(self, data: Iterator[CrystalBatch]) -> dict[str, float]:
        terms: torch.Tensor | None = None
        structures = atoms = 0
        grad_norm = None
        for _ in range(self.accumulation):
            batch, out = self._finite_forward(data)
            if self.counters.loss_keys is None:
                self.counters.loss_keys = ["loss"] + sorted(k for k in out if k != "loss")
            self.engine.backward(out["loss"])
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = parallelize.unreported_grad_norm(self.engine, self.tc.zero_stage, self.tc.precision)
            self.engine.step()
            values = torch.stack([out[k].detach().float().cpu() for k in self.counters.loss_keys]).double()
            terms = values if terms is None else terms + values
            structures += batch.num_structures
            atoms += batch.num_atoms_total
        if grad_norm is None:
            grad_norm = parallelize.reported_grad_norm(self.engine)
        stop = 1.0 if self._stop_signal else 0.0
        packed = torch.cat([terms / self.accumulation, torch.tensor([structures, atoms, stop], dtype=torch.float64)])
        reduced = all_reduce_sum(packed)
        k = len(self.counters.loss_keys)
        result = {key: float(reduced[i]) / self.world_size for i, key in enumerate(self.counters.loss_keys)}
        result.update(structures=float(reduced[k]), atoms=float(reduced[k + 1]), stop=float(reduced[k + 2]),
                      grad_norm=grad_norm)
        return result

    def _run_hooks(self) -> None:
        for every, fn, name in self.hooks:
            if self.step % every:
                continue
            saved = ckpt.rng_state()
            try:
                out = fn(self, self.step)
            finally:
                ckpt.set_rng_state(saved)
            if out and self.is_main:
                with (self.run_dir / "hooks.jsonl").open("a") as fh:
                    fh.write(json.dumps({"step": self.step, "hook": name, **out}, sort_keys=True) + "\n")
                self.metrics.log_extra(out, step=self.step)

    # --- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `train.max_steps` (or a stop signal); return the summary (also summary.json)."""
        resumed_from = self._start()
        start_step, started = self.step, time.perf_counter()
        status = "completed"
        progress = tqdm(total=self.tc.max_steps, initial=self.step, disable=not self.is_main,
                        desc="train", unit="step", dynamic_ncols=True)
        throughput = Throughput()
        data = self._batches()
        try:
            while self.step < self.tc.max_steps:
                lr = float(self.optimizer.param_groups[0]["lr"])
                result = self._train_step(data)
                self._end_step(result)
                throughput.add(result)
                if self._due(self.tc.log_every):
                    self._log_step(result, lr, throughput)
                progress.update(1)
                progress.set_postfix(loss=f"{self.counters.last_loss:.4f}", lr=f"{lr:.2e}")
                self._run_hooks()
                stop = result["stop"] > 0
                if stop or self._due(self.tc.checkpoint_every):
                    self.save_checkpoint()
                if stop:
                    status = "preempted"
                    self._record_preemption()
                    break
        finally:
            progress.close()
            self._restore_signal_handlers()
            torch.autograd.set_detect_anomaly(False)
        return self._finish(status, resumed_from, self.step - start_step, time.perf_counter() - started)

    def _start(self) -> Path | None:
        """Lock and prepare the run directory, open the logs, resume (the checkpoint it resumed
        from, or None), record run.json, and arm anomaly detection and the signal handlers."""
        self._lock_run_dir()
        resuming = ckpt.resolve_checkpoint(self.tc.resume, self.run_dir) is not None
        self._prepare_run_dir(resuming)
        self.metrics = MetricsLogger(
            self.run_dir, self.is_main, self.tc.wandb, OmegaConf.to_container(OmegaConf.structured(self.cfg)),
            run_name=self.run_dir.name, wandb_id=self._previous_wandb_id(),
        )
        resumed_from = self._resume()
        self.metrics.truncate_after(self.step)
        self._write_run_info()
        if self.tc.debug:
            torch.autograd.set_detect_anomaly(True)
        self._install_signal_handlers()
        return resumed_from

    def _end_step(self, result: dict[str, float]) -> None:
        """After the optimizer step: count it, update the EMA, the loss average and the LR schedule."""
        self.counters.step += 1
        self.ema.update()
        self.loss_average.update(result["loss"])
        self.schedule.step(self.loss_average.value)
        self.counters.last_loss = result["loss"]
        if self.counters.first_loss is None:
            self.counters.first_loss = self.counters.last_loss

    def _due(self, every: int) -> bool:
        """Whether this step is one of every `every` steps, or the last."""
        return self.step % every == 0 or self.step == self.tc.max_steps

    def _log_step(self, result: dict[str, float], lr: float, throughput: Throughput) -> None:
        record = {"step": self.step, "epoch": self.counters.epoch, "lr": lr,
                  "grad_norm": result["grad_norm"],
                  **throughput.rates(),
                  "memory_mb": peak_memory_mb(self.device),
                  "nonfinite_skips": self.counters.nonfinite_skips,
                  **{k: result[k] for k in self.counters.loss_keys}}
        self.metrics.log(record)
        if self.tc.debug and self.is_main:
            tqdm.write(json.dumps(record, sort_keys=True))
        throughput.reset()

    def _record_preemption(self) -> None:
        if self.is_main:
            self.metrics.event({"event": "preempted", "step": self.step,
                                "signal": self._stop_signal or "peer rank"})

    def _finish(self, status: str, resumed_from: Path | None, steps_run: int, wall: float) -> dict[str, Any]:
        """The end summary: written to summary.json (rank 0) and W&B, and returned."""
        summary = {
            "status": status,
            "exit_code": EXIT_PREEMPTED if status == "preempted" else EXIT_OK,
            "step": self.step,
            "steps_this_session": steps_run,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "first_loss": self.counters.first_loss,
            "last_loss": self.counters.last_loss,
            "nonfinite_skips": self.counters.nonfinite_skips,
            "wall_time_s": wall,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "metrics": str(self.run_dir / "metrics.jsonl"),
            "world_size": self.world_size,
            "zero_stage": self.tc.zero_stage,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        self.metrics.finish(summary)
        return summary

    def close(self) -> None:
        """Release DeepSpeed's engine (lets one process run several trainers, e.g. in tests)."""
        parallelize.destroy_engine(self.engine)
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None


def format_summary(summary: dict[str, Any]) -> str:
    def fmt(x):
        return f"{x:.4f}" if isinstance(x, float) else str(x)

    lines = [
        f"training {summary['status']} at step {summary['step']} "
        f"({summary['steps_this_session']} steps in {summary['wall_time_s']:.1f} s, "
        f"{summary['world_size']} rank(s), ZeRO-{summary['zero_stage']})",
        f"  loss        {fmt(summary['first_loss'])} -> {fmt(summary['last_loss'])}",
        f"  run dir     {summary['run_dir']}",
        f"  checkpoint  {summary['checkpoint']}",
        f"  metrics     {summary['metrics']}",
    ]
    if summary["nonfinite_skips"]:
        lines.append(f"  skipped     {summary['nonfinite_skips']} batches with non-finite loss")
    if summary["status"] == "preempted":
        lines.append(f"  resume with train.resume=auto (exit code {EXIT_PREEMPTED})")
    return "\n".join(lines)


def run_and_report(trainer: Trainer) -> int:
    """Fit, print the end summary on rank 0, and return the process exit code."""
    try:
        summary = trainer.fit()
    except NonFiniteLossError as exc:
        if trainer.is_main:
            print(f"xtalgen: error: {exc}", flush=True)
        return EXIT_NONFINITE
    finally:
        trainer.close()
    if trainer.is_main:
        print(format_summary(summary), flush=True)
    return int(summary["exit_code"])


__all__ = [
    "EXIT_CORRUPT_DATA", "EXIT_NONFINITE", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_RUN_DIR_IN_USE", "INJECT_NAN_ENV",
    "NonFiniteLossError", "TrainCounters", "Trainer", "format_summary", "injected_nan_step", "run_and_report",
]
