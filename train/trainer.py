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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import random
import resource
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from xtalgen.batch import CrystalBatch
from xtalgen.dirlock import DirectoryLock, OutputInUseError
from xtalgen.schema import Config, ConfigError, OptimConfig, save_config
from xtalgen.sharding.codec import ShardCorruptionError
from xtalgen.sharding.remote import is_remote, shard_location
from xtalgen.train import checkpoint as ckpt
from xtalgen.train.deepspeed_config import build_deepspeed_config, validate_train_config
from xtalgen.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, stop_together
from xtalgen.train.ema import ExponentialMovingAverage
from xtalgen.train.metrics_log import MetricsLogger

log = logging.getLogger("xtalgen.train")
# DeepSpeed calls torch.distributed functions that torch now marks deprecated, once per step.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)

EXIT_OK = 0
EXIT_CORRUPT_DATA = 2  # a damaged shard: bad input, like a config error; rerunning will not help
EXIT_RUN_DIR_IN_USE = 2  # another live run holds train.run_dir: bad input too, refused before any write
EXIT_NONFINITE = 3  # too many non-finite losses: the run stopped, do not requeue blindly
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; requeue to continue

PeriodicHook = Callable[["Trainer", int], "dict[str, Any] | None"]


class NonFiniteLossError(RuntimeError):
    """Raised when more batches than `train.max_nonfinite_skips` gave a NaN/inf loss."""


class LossForward(nn.Module):
    """Routes DeepSpeed's `engine(batch)` to `model.loss(batch)`, so ZeRO-3 hooks see a forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: CrystalBatch) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


class LRSchedule:
    """Linear warm-up, then plateau decay (on the loss average), constant, or cosine to `min_lr`."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
        self.kind, self.warmup_steps, self.steps = cfg.scheduler, cfg.warmup_steps, 0
        min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        decay_steps = max(1, max_steps - cfg.warmup_steps)

        def factor(step: int) -> float:  # step = optimizer steps already taken
            warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
            if self.kind != "cosine" or step < cfg.warmup_steps:
                return warm
            progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
            return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.plateau = None
        if self.kind == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                min_lr=cfg.min_lr,
            )

    def step(self, loss_average: float) -> None:
        self.steps += 1
        # LambdaLR rewrites the lr from the base each step, so after warm-up it must stop
        # stepping when the plateau schedule owns the lr.
        if self.plateau is None or self.steps <= self.warmup_steps:
            self.lambda_lr.step()
        else:
            self.plateau.step(loss_average)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "lambda_lr": self.lambda_lr.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.lambda_lr.load_state_dict(state["lambda_lr"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])


class LossAverage:
    """Bias-corrected exponential moving average of the global train loss (what plateau watches)."""

    def __init__(self, beta: float = 0.98):
        self.beta, self.value_raw, self.count = beta, 0.0, 0

    def update(self, value: float) -> None:
        self.count += 1
        self.value_raw = self.beta * self.value_raw + (1 - self.beta) * value

    @property
    def value(self) -> float:
        return self.value_raw / (1 - self.beta**self.count) if self.count else float("nan")

    def state_dict(self) -> dict:
        return {"beta": self.beta, "value_raw": self.value_raw, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.value_raw, self.count = state["beta"], state["value_raw"], state["count"]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, loader, *, dist_info: DistInfo | None = None,
                 stats: dict | None = None, run_info: dict | None = None):
        self.cfg, self.tc = cfg, cfg.train
        validate_train_config(self.tc)
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
        self.engine, self.optimizer = self._build_engine(model)
        self.ema = ExponentialMovingAverage(self.engine.module, self.tc.ema_decay)
        self.schedule = LRSchedule(self.optimizer, self.tc.optim, self.tc.max_steps)
        self.loss_average = LossAverage()

        self.step, self.epoch = 0, 0
        self.nonfinite_skips = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.loss_keys: list[str] | None = None
        self.last_checkpoint: Path | None = None
        self.hooks: list[tuple[int, PeriodicHook, str]] = []
        self._stop_signal: str | None = None
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

    def _build_engine(self, model: nn.Module):
        import deepspeed

        wrapped = LossForward(model)
        optim = self.tc.optim
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        # A client torch AdamW: no fused/CPU-Adam build, same numerics on CPU and GPU.
        optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas),
                                      weight_decay=optim.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=self.ds_config,
                                               dist_init_required=False)
        return engine, optimizer

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
        import deepspeed

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
            versions={"torch": torch.__version__, "deepspeed": deepspeed.__version__,
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
    def _rank_state(self) -> dict:
        return {
            "format": "xtalgen-trainer-state-v1",
            "step": self.step,
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "rng": ckpt.rng_state(),
            "loader": self.loader.state_dict(),
            "ema": self.ema.state_dict(),
            "schedule": self.schedule.state_dict(),
            "loss_average": self.loss_average.state_dict(),
            "nonfinite_skips": self.nonfinite_skips,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "loss_keys": self.loss_keys,
        }

    def save_checkpoint(self) -> Path:
        tag = ckpt.tag_for_step(self.step)
        directory = self.checkpoint_root / tag
        ckpt.save_rank_state(directory, self.rank, self._rank_state())
        barrier()  # every rank's state is on disk before DeepSpeed writes `latest`
        self.engine.save_checkpoint(str(self.checkpoint_root), tag=tag,
                                    client_state={"step": self.step, "epoch": self.epoch,
                                                  "world_size": self.world_size})
        barrier()
        if self.is_main:
            ckpt.prune_checkpoints(self.checkpoint_root, self.tc.keep_checkpoints)
        self.last_checkpoint = directory
        return directory

    def _resume(self) -> Path | None:
        source = ckpt.resolve_checkpoint(self.tc.resume, self.run_dir)
        if source is None:
            return None
        saved_world = ckpt.saved_world_size(source)
        if saved_world != self.world_size:
            raise ConfigError(
                f"config key 'train.resume': {source} was written by {saved_world} ranks but this run "
                f"has {self.world_size}; exact resume needs the same number of ranks. Consolidate it "
                "(`xtalgen train consolidate`) and start a new run from those weights instead"
            )
        load_path, _ = self.engine.load_checkpoint(str(source.parent), tag=source.name,
                                                   load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint at {source}")
        state = ckpt.load_rank_state(source, self.rank)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.loader.load_state_dict(state["loader"])
        self.ema.load_state_dict(state["ema"])
        self.schedule.load_state_dict(state["schedule"])
        self.loss_average.load_state_dict(state["loss_average"])
        self.nonfinite_skips = int(state["nonfinite_skips"])
        self.first_loss, self.loss_keys = state["first_loss"], state["loss_keys"]
        self.last_loss = state.get("last_loss")
        ckpt.set_rng_state(state["rng"])
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
            self.loader.set_epoch(self.epoch)
            produced = False
            for batch in self.loader:
                produced = True
                yield batch
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs > 1:
                raise RuntimeError("the loader produced no batches for this rank: too little data "
                                   f"for {self.world_size} ranks, or an empty split")
            self.epoch += 1

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
        if self.tc.debug_inject_nan_step != self.step + 1 or self.rank != 0 or self._nan_injected:
            return False
        self._nan_injected = True
        return True

    def _record_nonfinite(self, batch: CrystalBatch, local_bad: bool, bad_ranks: int) -> None:
        self.nonfinite_skips += 1
        if local_bad:
            log.warning("rank %d: non-finite loss at step %d, batch skipped on every rank; ids: %s",
                        self.rank, self.step + 1, ", ".join(batch.ids))
            if self.metrics is not None:
                self.metrics.event({"event": "nonfinite_loss", "step": self.step + 1, "rank": self.rank,
                                    "ranks_affected": bad_ranks, "ids": list(batch.ids),
                                    "skips_so_far": self.nonfinite_skips})
        if self.nonfinite_skips > self.tc.max_nonfinite_skips:
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1}: {self.nonfinite_skips} batches skipped, more "
                f"than train.max_nonfinite_skips={self.tc.max_nonfinite_skips}. The run stopped without "
                f"training on them; the last good checkpoint is {self.last_checkpoint}. Offending batch "
                f"ids are in {self.run_dir / 'events.jsonl'}"
            )

    def _grad_norm_if_unreported(self) -> float | None:
        """DeepSpeed reports the norm for ZeRO/bf16; plain fp32 stage 0 clips without keeping it."""
        if self.tc.zero_stage > 0 or self.tc.precision != "fp32":
            return None
        norms = [p.grad.norm() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0  # the 2-norm of all gradients

    def _train_step(self, data: Iterator[CrystalBatch]) -> dict[str, float]:
        terms: torch.Tensor | None = None
        structures = atoms = 0
        grad_norm = None
        for _ in range(self.accumulation):
            batch, out = self._finite_forward(data)
            if self.loss_keys is None:
                self.loss_keys = ["loss"] + sorted(k for k in out if k != "loss")
            self.engine.backward(out["loss"])
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._grad_norm_if_unreported()
            self.engine.step()
            values = torch.stack([out[k].detach().float().cpu() for k in self.loss_keys]).double()
            terms = values if terms is None else terms + values
            structures += batch.num_structures
            atoms += batch.num_atoms_total
        if grad_norm is None:
            reported = self.engine.get_global_grad_norm()
            grad_norm = float(reported) if reported is not None else float("nan")
        stop = 1.0 if self._stop_signal else 0.0
        packed = torch.cat([terms / self.accumulation, torch.tensor([structures, atoms, stop], dtype=torch.float64)])
        reduced = all_reduce_sum(packed)
        k = len(self.loss_keys)
        result = {key: float(reduced[i]) / self.world_size for i, key in enumerate(self.loss_keys)}
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
        start_step, started = self.step, time.perf_counter()
        status = "completed"
        progress = tqdm(total=self.tc.max_steps, initial=self.step, disable=not self.is_main,
                        desc="train", unit="step", dynamic_ncols=True)
        window_start, window_structures, window_atoms = time.perf_counter(), 0.0, 0.0
        data = self._batches()
        try:
            while self.step < self.tc.max_steps:
                lr = float(self.optimizer.param_groups[0]["lr"])
                result = self._train_step(data)
                self.step += 1
                self.ema.update()
                self.loss_average.update(result["loss"])
                self.schedule.step(self.loss_average.value)
                self.last_loss = result["loss"]
                if self.first_loss is None:
                    self.first_loss = self.last_loss
                window_structures += result["structures"]
                window_atoms += result["atoms"]
                if self.step % self.tc.log_every == 0 or self.step == self.tc.max_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record = {"step": self.step, "epoch": self.epoch, "lr": lr,
                              "grad_norm": result["grad_norm"],
                              "structures_per_s": window_structures / elapsed,
                              "atoms_per_s": window_atoms / elapsed,
                              "memory_mb": peak_memory_mb(self.device),
                              "nonfinite_skips": self.nonfinite_skips,
                              **{k: result[k] for k in self.loss_keys}}
                    self.metrics.log(record)
                    if self.tc.debug and self.is_main:
                        tqdm.write(json.dumps(record, sort_keys=True))
                    window_start, window_structures, window_atoms = time.perf_counter(), 0.0, 0.0
                progress.update(1)
                progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}")
                self._run_hooks()
                stop = result["stop"] > 0
                if stop or self.step % self.tc.checkpoint_every == 0 or self.step == self.tc.max_steps:
                    self.save_checkpoint()
                if stop:
                    status = "preempted"
                    if self.is_main:
                        self.metrics.event({"event": "preempted", "step": self.step,
                                            "signal": self._stop_signal or "peer rank"})
                    break
        finally:
            progress.close()
            self._restore_signal_handlers()
            torch.autograd.set_detect_anomaly(False)
        steps_run = self.step - start_step
        wall = time.perf_counter() - started
        summary = {
            "status": status,
            "exit_code": EXIT_PREEMPTED if status == "preempted" else EXIT_OK,
            "step": self.step,
            "steps_this_session": steps_run,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "nonfinite_skips": self.nonfinite_skips,
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
        with contextlib.suppress(Exception):
            self.engine.destroy()
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
    "EXIT_CORRUPT_DATA", "EXIT_NONFINITE", "EXIT_RUN_DIR_IN_USE", "EXIT_OK", "EXIT_PREEMPTED", "LRSchedule", "LossForward",
    "NonFiniteLossError", "Trainer", "format_summary", "run_and_report",
]
