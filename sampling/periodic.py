"""Periodic sampling during training: a few structures from the EMA model, scored cheaply.

`make_periodic_sampler(cfg, reference)` returns `fn(model, step) -> metrics` that the trainer
registers (`Trainer.add_periodic_hook(cfg.train.sample_every, fn)`). Each call samples
`train.sample_count` structures with `train.sample_steps` diffusion steps and scores validity,
uniqueness and novelty against the reference (training) structures with the evaluator's cheap mode
(stability too when `train.sample_relax`). Every call draws the same noise (a fixed seed), so the
curves over training steps compare models, not random draws; and it never touches torch's global
RNG, so a resumed training run still reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from xtalgen.record import CrystalRecord
from xtalgen.sampling.conditions import parse_conditions
from xtalgen.sampling.driver import batch_rows, sample_batch_structures
from xtalgen.sampling.plan import SamplingPlan
from xtalgen.schema import Config

PREFIX = "sample/"
TABLE_KEY = PREFIX + "structures"  # list of row dicts, one per structure (a W&B table)


def make_periodic_sampler(
    cfg: Config,
    reference: Sequence[CrystalRecord] | Sequence | str | Path | None = None,
    *,
    model_cfg=None,
    stats: dict | None = None,
) -> Callable[[torch.nn.Module, int], dict]:
    """Build the periodic pass. `reference` (for novelty): training records, pymatgen structures, or a
    path the evaluator reads (e.g. the training shard set).

    `model_cfg`/`stats` default to `cfg.model` and the model's own `stats` attribute.
    """
    model_cfg = cfg.model if model_cfg is None else model_cfg
    sample_cfg = _periodic_sample_config(cfg)
    conditions = parse_conditions(sample_cfg.conditions, model_cfg.conditions)
    plan = SamplingPlan(sample_cfg.num_samples, sample_cfg.batch_size, sample_cfg.seed)
    reference_structures: list | None = None

    def periodic_sample(model: torch.nn.Module, step: int) -> dict:
        nonlocal reference_structures
        if reference_structures is None and reference:
            reference_structures = _to_structures(reference)
        model_stats = stats if stats is not None else model.stats
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            structures, rows = [], []
            for batch in range(plan.num_batches):
                made = sample_batch_structures(
                    model, model_cfg, model_stats, sample_cfg, plan, batch, conditions, device
                )
                structures += made
                rows += batch_rows(plan, batch, sample_cfg, conditions, made)
        finally:
            model.train(was_training)
        sample_seconds = time.perf_counter() - start
        metrics = _evaluate(structures, rows, reference_structures, relax=cfg.train.sample_relax)
        metrics[PREFIX + "step"] = step
        metrics[PREFIX + "sample_seconds"] = sample_seconds
        metrics[PREFIX + "seconds"] = time.perf_counter() - start
        return metrics

    return periodic_sample


def _periodic_sample_config(cfg: Config):
    """The `sample` section with the periodic pass's count and step number."""
    from dataclasses import replace

    count = cfg.train.sample_count
    if count < 1:
        raise ValueError(f"train.sample_count must be >= 1 for periodic sampling, got {count}")
    return replace(
        cfg.sample,
        num_samples=count,
        batch_size=min(count, cfg.sample.batch_size),
        num_steps=cfg.train.sample_steps,
        seed=cfg.train.seed,
    )


def _to_structures(reference):
    """Records become pymatgen structures once (not at every call); a path (shard set, CSV, CIF
    folder) goes to the evaluator as it is, which streams it."""
    if isinstance(reference, (str, Path)):
        return reference
    return [r.to_structure() if isinstance(r, CrystalRecord) else r for r in reference]


def _evaluate(structures: list, rows: list[dict], reference: list | None, relax: bool) -> dict:
    """Score with the evaluator's cheap mode; returns rates (floats) and the per-structure table."""
    from xtalgen.evaluation import evaluate_structures

    eval_rows, summary = evaluate_structures(
        structures,
        reference=reference,
        relax=relax,
        ids=[row["id"] for row in rows],
        metadata=[{"conditions": row["conditions"]} for row in rows],
    )
    metrics: dict = {}
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # notes, names, and rates that were not computed (None)
        if isinstance(value, float) and not math.isfinite(value):
            continue
        metrics[PREFIX + key] = float(value)
    table = []
    for row, scored in zip(rows, eval_rows):
        merged = {k: row[k] for k in ("id", "formula", "num_atoms")}
        merged.update({k: v for k, v in scored.items() if _is_table_scalar(v) and not k.startswith("_")})
        table.append(merged)
    metrics[TABLE_KEY] = table
    return metrics


def _is_table_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
