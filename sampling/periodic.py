"""Periodic sampling during training: a few structures from the EMA model, scored cheaply.

`make_periodic_sampler(cfg, reference)` returns `fn(model, step) -> metrics` that the trainer
registers (`Trainer.add_periodic_hook(cfg.train.sample_every, fn)`). Each call samples
`train.sample_count` structures with `train.sample_steps` diffusion steps and scores validity,
uniqueness and novelty against the reference (training) structures with the evaluator's cheap mode,
and always the physical-cell rate (volume per atom in the reference's range, see
`xtalgen.evaluation.physical`).

Stability: with `train.sample_relax` every sample is relaxed and scored. Otherwise, when a hull
file is available (`make_periodic_sampler(..., hull=PATH)`, the config's `evaluate.hull`, or the environment
variable `XTALGEN_HULL`, e.g. the file of `xtalgen data download mp_hull`),
the first `RELAX_COUNT` samples are relaxed for `RELAX_STEPS` steps and scored against it: a
cheap estimate of the stable and SUN rates (`sample/stable_rate`, `sample/sun_rate`, over those
`sample/stability_sample_count` samples; a sample that is not relaxed counts as not stable).

Every call draws the same noise (a fixed seed), so the curves over training steps compare models,
not random draws; and it never touches torch's global RNG, so a resumed training run still
reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import math
import os
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
HULL_ENV = "XTALGEN_HULL"  # a hull file (ComputedEntry JSON) to score stability against
RELAX_COUNT = 4  # samples relaxed per periodic pass for the stability estimate (cheap)
RELAX_STEPS = 50  # optimizer steps of those relaxations


def make_periodic_sampler(
    cfg: Config,
    reference: Sequence[CrystalRecord] | Sequence | str | Path | None = None,
    *,
    model_cfg=None,
    stats: dict | None = None,
    hull: str | Path | None = None,
) -> Callable[[torch.nn.Module, int], dict]:
    """Build the periodic pass. `reference` (for novelty): training records, pymatgen structures, or a
    path the evaluator reads (e.g. the training shard set). `hull`: a hull file for the stability
    estimate (default: the config's `evaluate.hull`, else $XTALGEN_HULL, else none).

    `model_cfg`/`stats` default to `cfg.model` and the model's own `stats` attribute.
    """
    model_cfg = cfg.model if model_cfg is None else model_cfg
    sample_cfg = _periodic_sample_config(cfg)
    conditions = parse_conditions(sample_cfg.conditions, model_cfg.conditions)
    plan = SamplingPlan(sample_cfg.num_samples, sample_cfg.batch_size, sample_cfg.seed)
    reference_structures: list | None = None
    hull_path = hull or cfg.evaluate.hull or os.environ.get(HULL_ENV) or None
    stability = _Stability(cfg, hull_path)

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
                made, targets = sample_batch_structures(
                    model, model_cfg, model_stats, sample_cfg, plan, batch, conditions, device
                )
                structures += made
                rows += batch_rows(plan, batch, sample_cfg, conditions, made, targets=targets)
        finally:
            model.train(was_training)
        sample_seconds = time.perf_counter() - start
        metrics = _evaluate(structures, rows, reference_structures, relax=cfg.train.sample_relax,
                            stability=stability)
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


class _Stability:
    """The hull file and the potential, loaded on first use and kept for every later pass."""

    def __init__(self, cfg: Config, hull_path, relax_count: int = RELAX_COUNT, relax_steps: int = RELAX_STEPS):
        self.cfg, self.hull_path = cfg, hull_path
        self.relax_count, self.relax_steps = relax_count, relax_steps
        self._hull = self._potential = None

    @property
    def available(self) -> bool:
        return self.hull_path is not None

    def hull(self):
        if self._hull is None:
            from xtalgen.evaluation.hull import HullFile, default_cache_dir

            cache = self.cfg.evaluate.cache_dir or default_cache_dir()
            self._hull = HullFile.load(self.hull_path, cache)
        return self._hull

    def potential(self):
        if self._potential is None:
            from xtalgen.evaluation.relax import load_potential

            self._potential = load_potential(self.cfg.evaluate.potential, device=self.cfg.evaluate.device)
        return self._potential


def _evaluate(structures: list, rows: list[dict], reference: list | None, relax: bool,
              stability: _Stability | None = None) -> dict:
    """Score with the evaluator's cheap mode (plus the stability estimate when a hull is available);
    returns rates (floats) and the per-structure table."""
    from xtalgen.evaluation import evaluate_structures

    hull = stability.hull() if stability is not None and stability.available else None
    eval_rows, summary = evaluate_structures(
        structures,
        reference=reference,
        relax=relax,
        ids=[row["id"] for row in rows],
        metadata=[{"conditions": row["conditions"]} for row in rows],
        hull=hull if relax else None,
        potential=stability.potential() if relax and hull is not None else None,
    )
    if not relax and hull is not None:
        summary.update(_stability_estimate(structures, rows, eval_rows, reference, summary, stability, hull))
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


def _stability_estimate(structures, rows, eval_rows, reference, summary, stability: _Stability, hull) -> dict:
    """Relax the first few samples briefly and score them against the hull; the set-level flags
    (unique, novel) come from the evaluation of all samples. Updates `eval_rows` in place."""
    import dataclasses

    from xtalgen.evaluation import evaluate_structures

    count = min(stability.relax_count, len(structures))
    cfg = dataclasses.replace(stability.cfg.evaluate, relax_steps=stability.relax_steps, workers=1)
    band = tuple(summary["physical_volume_per_atom_band"])
    sub_rows, _ = evaluate_structures(
        structures[:count], reference=None, relax=True, cfg=cfg, ids=[row["id"] for row in rows[:count]],
        potential=stability.potential(), hull=hull, volume_band=band,
    )
    has_novelty = summary.get("novel_rate") is not None
    for full, sub in zip(eval_rows, sub_rows):
        for key in ("relaxed", "relax_error", "relax_failure", "energy_per_atom", "e_above_hull", "stable",
                    "on_or_below_hull", "rmsd"):
            if key in sub:
                full[key] = sub[key]
        if has_novelty:
            full["sun"] = bool(full.get("stable") and full.get("unique") and full.get("novel"))
    judged = eval_rows[:count]
    e_hull = [r["e_above_hull"] for r in judged if isinstance(r.get("e_above_hull"), float)
              and math.isfinite(r["e_above_hull"])]
    return {
        "stability_sample_count": count,
        "stable_rate": sum(1 for r in judged if r.get("stable")) / count if count else None,
        "sun_rate": sum(1 for r in judged if r.get("sun")) / count if count and has_novelty else None,
        "relaxed_count": sum(1 for r in judged if r.get("relaxed")),
        "relax_failures": sum(1 for r in judged if r.get("relax_failure")),
        "mean_e_above_hull": sum(e_hull) / len(e_hull) if e_hull else None,
    }


def _is_table_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
