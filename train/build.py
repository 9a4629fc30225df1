"""Wiring from a config to a ready Trainer: process group, shard loader, diffusion model, hooks."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from xtalgen.schema import Config, ConfigError
from xtalgen.sharding.codec import ShardCorruptionError
from xtalgen.sharding.remote import is_remote
from xtalgen.train.distributed import init_distributed, stop_together
from xtalgen.train.trainer import Trainer

log = logging.getLogger("xtalgen.train")

# Novelty of periodic samples is judged against at most this many training structures: enough
# for a trend during training; `xtalgen evaluate` does the full comparison.
REFERENCE_LIMIT = 50_000


def build_trainer(cfg: Config) -> Trainer:
    """The Trainer for `xtalgen train`: CrystalLoader over `data.shards`, CrystalDiffusion model."""
    from xtalgen.datasets.loader import CrystalLoader
    from xtalgen.models.diffusion import build_model

    check_inputs(cfg)
    dist_info = init_distributed()
    # Every rank checks the same files here (an LMDB file's sha256, the atom-count index): agreeing
    # on the outcome gives one message for a damaged file, not one per rank.
    loader, error = None, None
    try:
        loader = CrystalLoader.from_config(
            cfg.data.shards, cfg.data.loader, split=cfg.data.train_split,
            batch_size=cfg.train.micro_batch_structures,  # the engine's micro batch is the loader's batch
            rank=dist_info.rank, world_size=dist_info.world_size,
            property_names=[c.name for c in cfg.model.conditions],
        )
    except ShardCorruptionError as exc:
        error = exc
    stop_together(error)
    stats = loader.manifest_stats
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, stats)
    trainer = Trainer(cfg, model, loader, dist_info=dist_info, stats=stats)
    if cfg.train.sample_every > 0:
        attach_periodic_sampling(trainer, cfg)
    return trainer


def check_inputs(cfg: Config) -> None:
    """Refuse a run whose shards or resume checkpoint are missing, before any process group exists.

    `xtalgen train ... --check` runs just this (and the config's own validation), so a batch
    script can stop on a typo in one line before it starts its ranks, or a user can run it on a
    login node before submitting. Raises `ConfigError` naming the key.
    """
    from xtalgen.train import checkpoint as ckpt

    if not cfg.data.shards:
        raise ConfigError("config key 'data.shards': set it to a shard directory (see `xtalgen shard build`)")
    if is_remote(cfg.data.shards):
        check_remote_shards(cfg.data.shards)
    elif not (Path(cfg.data.shards) / "manifest.json").exists():
        raise ConfigError(f"config key 'data.shards': {cfg.data.shards} has no manifest.json")
    try:  # `auto` with no checkpoint yet is a fresh start; a named checkpoint must exist
        ckpt.resolve_checkpoint(cfg.train.resume, Path(cfg.train.run_dir))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None


def check_remote_shards(location: str) -> None:
    """A URL or `pipe:` shard set: fetch its manifest now, so that a 404, a failing command, a
    remote LMDB set or a bad template is one line naming the key before any rank starts (each rank
    fetches the manifest again when its loader opens the set; it is small)."""
    from xtalgen.sharding.reader import open_shards

    try:
        open_shards(location)
    except (ShardCorruptionError, ValueError) as exc:  # ShardUnavailableError is one of the former
        raise ConfigError(f"config key 'data.shards': {exc}") from None


def attach_periodic_sampling(trainer: Trainer, cfg: Config) -> None:
    """Every `train.sample_every` steps, sample with the EMA weights and log the SUN-style metrics."""
    from xtalgen.sampling.periodic import make_periodic_sampler

    # Under ZeRO-3 every rank holds a slice of the weights, so all ranks run the (identically seeded)
    # sampler together; otherwise rank 0 samples alone.
    everyone = cfg.train.zero_stage == 3
    reference, error = None, None
    try:
        reference = training_reference(cfg) if everyone or trainer.is_main else None
    except ShardCorruptionError as exc:  # read by some ranks only: the others must not wait for them
        error = exc
    stop_together(error)
    sampler = make_periodic_sampler(cfg, reference=reference, stats=trainer.stats)

    def periodic_sampling(trainer: Trainer, step: int) -> dict | None:
        if not (everyone or trainer.is_main):
            return None
        with trainer.ema_weights():
            metrics = sampler(trainer.model, step)
        return metrics if trainer.is_main else None

    trainer.add_periodic_hook(cfg.train.sample_every, periodic_sampling, name="sample")


def training_reference(cfg: Config, limit: int = REFERENCE_LIMIT) -> list:
    """Training records that periodic samples are checked against for novelty (the first `limit`)."""
    from xtalgen.sharding.reader import open_shards

    shards = open_shards(cfg.data.shards)
    return list(itertools.islice(shards.iter_records(cfg.data.train_split), limit))
