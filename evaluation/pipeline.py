"""The SUN evaluation: per-structure checks and relaxation, then set-level uniqueness, novelty,
energy above hull and property adherence.

Two stages:

1. per structure (the expensive part, resumable): validity, relaxation with the potential (only
   structurally valid structures; a pool of processes when `workers > 1`), space group, HHI,
   magnetic density. Each result is appended to a JSONL log as it finishes; a rerun after a kill
   reads the log and does only what is missing (a line cut short by the kill is discarded);
2. over the set (cheap, recomputed every time): uniqueness, novelty vs the reference structures,
   energy above the hull of the reference set (see `hull.py`), stable / SUN flags, targets.

Two-pass relaxation (opt-in: `evaluate.relax_screen_fmax=0.1`; used only when stability is assessed
against a hull): stage 1 relaxes every structure to the loose screening fmax. Energies above the
hull are then computed, and the structures whose screening e_above_hull lies below the largest
threshold the summary reports (`stability_threshold`, or an `energy_above_hull` target) plus
`evaluate.refine_window` are relaxed on, from their screened structure, to `relax_fmax`; the others
keep the screening result, as do those whose stability is not assessed (never stable). Rows say
which (`refined`, `relax_fmax_reached`: the fmax met, None when the step cap was hit;
`screen_energy_per_atom` / `screen_e_above_hull` of a refined one).
`relax_steps` caps each pass and is the sum of both in the rows; RMSD is from the input structure.
A screen that hits the step cap is not refined: FIRE's path does not depend on fmax, so a single
pass would have stopped at the same step. A failure in either pass makes the row a relaxation
failure, as in one pass (never stable). A refinement is appended to the log when it finishes (the
later line of an id supersedes the earlier), and a rerun refines only what is still due, so it
resumes like stage 1. Caveat (measured, benchmarks/RESULTS.md): continuing from 0.1 to 0.05 eV/Å
lowers most Perov-5 structures by < 1 meV/atom, but a few that meet 0.1 eV/Å at a saddle drop by up
to 1.7 eV/atom; those far above the hull when screened are never refined and can be missed as
stable. Hence not the default.

Rates in the summary are over all structures given, as MatterGen reports them (an invalid or
unrelaxable structure counts as not stable). A structure that cannot be read, or on which a check
fails, is a row with `not_evaluated` (a reason code) and `not_evaluated_detail`, counted by reason in
the summary, and the others go on. Structures of more than `max_relax_atoms` atoms are not relaxed
(a CHGNet relaxation of 400 atoms takes minutes on a CPU) unless the limit is raised; they say so in
`relax_error` and are never stable. Structural validity includes a physical cell (volume
per atom in a band, see physical.py); cells outside it are not relaxed. Novelty and SUN are None
when no reference is given; stability and SUN are None ("not assessed", with the reason) when the
hull would hold elemental references only (no hull file, no reference set), unless allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure
from tqdm.auto import tqdm

from xtalgen.evaluation import hull as hull_lib
from xtalgen.evaluation.inputs import InputStructure, iter_structures, non_element_species
from xtalgen.evaluation.matching import MatchSettings, ReferenceIndex, duplicate_of, novel_flags
from xtalgen.evaluation.physical import (
    DEFAULT_VOLUME_PER_ATOM_BAND,
    NON_PHYSICAL_CELL,
    REFERENCE_BAND_MARGIN,
    in_band,
    non_physical_reason,
    reference_volume_band,
    volume_per_atom,
)
from xtalgen.evaluation.properties import (
    bulk_modulus,
    chemical_system,
    hhi_score,
    magnetic_density,
    meets_target,
    space_group_number,
    target_bounds,
)
from xtalgen.evaluation.relax import MP2020_FOOTING, Potential, RelaxResult, load_potential, relax_many
from xtalgen.evaluation.relax_result import displacement_rmsd
from xtalgen.evaluation.validity import VALID, compositional_validity, structural_validity
from xtalgen.record import CrystalRecord
from xtalgen.schema import EvaluateConfig

ON_HULL_TOLERANCE = 1e-6  # eV/atom: float noise of identical entries, nothing physical
RELAXED_KEY = "_relaxed"  # the relaxed structure in the log (kept out of the CSV)
EVALUATION_ERROR = "evaluation_error"  # not_evaluated: a per-structure check raised
TOO_MANY_ATOMS = "too many atoms"  # relax_failure: over evaluate.max_relax_atoms


# --- public API -----------------------------------------------------------------------------------
def evaluate_structures(
    structures: Sequence[Structure | None],
    reference=None,
    relax: bool = False,
    *,
    stability: bool | None = None,
    cfg: EvaluateConfig | None = None,
    ids: Sequence[str] | None = None,
    metadata: Sequence[dict] | None = None,
    log_path: str | Path | None = None,
    potential: Potential | None = None,
    progress: bool = False,
    hull: str | Path | hull_lib.HullFile | None = None,
    allow_elements_only_hull: bool = False,
    volume_band: tuple[float, float] | None = None,
) -> tuple[list[dict], dict]:
    """Score structures; returns (one row per structure, summary).

    reference: None, a path (shard set, CSV, CIF folder, extxyz) or a list of pymatgen Structures /
    CrystalRecords (the training set) for novelty and for the hull. relax: relax with
    `cfg.potential` first. stability: compute energies above the hull (default: = relax; without
    relaxation it uses single-point energies of the structures as given). The cheap mode
    (`relax=False`) gives validity, uniqueness and novelty in seconds for the trainer.

    hull: a file of published entries (ComputedEntry dicts, e.g. `xtalgen data download mp_hull`)
    that is the convex hull instead of the reference set relaxed with the potential. Without a hull
    of real compounds (no `hull`, no `reference`) stability and SUN are not assessed (None, with the
    reason in the summary) unless `allow_elements_only_hull`. volume_band: the physical-cell band of
    volume per atom (default: the reference's range, see physical.py, else the default band).
    """
    cfg = cfg or EvaluateConfig()
    stability = relax if stability is None else stability
    ids = _unique_ids(list(ids) if ids is not None else [str(i) for i in range(len(structures))])
    metadata = list(metadata) if metadata is not None else [{} for _ in structures]
    models = _Potentials(cfg, potential)
    if volume_band is None:
        volume_band, band_source = physical_band(reference, cfg)
    else:
        band_source = "given"

    hull_options = _HullOptions(hull, allow_elements_only_hull, relax)
    two_pass = relax and stability and two_pass_relaxation(cfg) and hull_options.assesses(reference)
    log = _ResultLog(log_path)
    rows_by_id = _per_structure_stage(structures, ids, metadata, relax, stability, cfg, models, log,
                                      progress, volume_band, screen_fmax=cfg.relax_screen_fmax if two_pass else None)
    rows = [rows_by_id[i] for i in ids]
    evaluated = [_evaluated_structure(row, s) for row, s in zip(rows, structures)]
    if not relax and cfg.reference_relax:  # unrelaxed structures are compared with unrelaxed references
        cfg = dataclasses.replace(cfg, reference_relax=False)
    scan, refinement = None, None
    if two_pass:
        if isinstance(hull_options.hull, (str, os.PathLike)):  # read once for both hull computations
            cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else hull_lib.default_cache_dir()
            hull_options = dataclasses.replace(hull_options, hull=hull_lib.HullFile.load(hull_options.hull, cache_dir,
                                                                                         progress))
        scan = _reference_scan(reference, evaluated, stability, hull_options, progress)
        refinement = _refine_stage(rows, structures, evaluated, reference, scan, cfg, models, log, progress,
                                   hull_options)
        evaluated = [_evaluated_structure(row, s) for row, s in zip(rows, structures)]
    summary = _set_stage(rows, evaluated, reference, stability, cfg, models, progress, hull_options, scan)
    if refinement is not None:
        summary.update(refinement)
    summary["physical_volume_per_atom_band"] = list(volume_band)
    summary["physical_volume_per_atom_band_source"] = band_source
    return rows, summary


def two_pass_relaxation(cfg: EvaluateConfig) -> bool:
    """Whether `cfg` asks for the two-pass relaxation: a screening fmax looser than `relax_fmax`.
    (It then runs when stability is assessed against a hull of real compounds; otherwise one pass.)"""
    return bool(cfg.relax_screen_fmax) and cfg.relax_screen_fmax > cfg.relax_fmax


def physical_band(reference, cfg: EvaluateConfig | None = None) -> tuple[tuple[float, float], str]:
    """(band, where it comes from): the reference's range of volume per atom (widened by
    `REFERENCE_BAND_MARGIN`) when a reference is given, else `DEFAULT_VOLUME_PER_ATOM_BAND`."""
    cfg = cfg or EvaluateConfig()
    if reference is not None:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else hull_lib.default_cache_dir()
        band = reference_volume_band(reference, cache_dir)
        if band is not None:
            return band, f"reference range +/- {REFERENCE_BAND_MARGIN:.0%}"
    return DEFAULT_VOLUME_PER_ATOM_BAND, "default"


def warm_reference_energies(structures: Sequence[Structure], reference, cfg: EvaluateConfig | None = None,
                            progress: bool = False) -> int:
    """Relax (or single-point, per `cfg.reference_relax`) and cache the reference structures that the
    hull of `structures` needs, as an evaluation would; returns how many there are. For benchmarks
    that time the evaluation alone (the reference cache is a one-time cost per reference set)."""
    cfg = cfg or EvaluateConfig()
    if reference is None:
        return 0
    present = [s for s in structures if s is not None]
    _, candidates = _reference_scan(reference, present, True, _HullOptions(), progress)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else hull_lib.default_cache_dir()
    for _ in _reference_energies(reference, candidates, cfg, _Potentials(cfg, None), cache_dir, progress):
        pass
    return len(candidates)


def evaluate_inputs(items: Sequence[InputStructure], reference=None, relax: bool = True, **kwargs):
    """`evaluate_structures` over what `inputs.iter_structures` read (unparsable entries included)."""
    return evaluate_structures(
        [item.structure for item in items],
        reference,
        relax,
        ids=[item.id for item in items],
        metadata=[{**item.metadata, **({"parse_error": item.error, "parse_reason": item.reason or "unparsable"}
                                       if item.structure is None else {})} for item in items],
        **kwargs,
    )


# --- stage 1: per structure -----------------------------------------------------------------------
class _Potentials:
    """Loads the potential once, on first use (the cheap mode never loads it)."""

    def __init__(self, cfg: EvaluateConfig, given: Potential | None):
        self.cfg, self._model, self._given = cfg, given, given is not None

    @property
    def model(self) -> Potential:
        if self._model is None:
            self._model = load_potential(self.cfg.potential, device=self.cfg.device)
        return self._model

    @property
    def relax_target(self) -> str | Potential:
        """What relax_many gets: the registry name for a process pool, else the loaded model."""
        # By name even when this process has loaded the model already (e.g. for the elemental
        # references): pool workers load their own copy.
        if self.cfg.workers > 1 and not self._given:
            return self.cfg.potential
        return self.model


def _per_structure_stage(structures, ids, metadata, relax, stability, cfg, models, log, progress, band,
                         screen_fmax: float | None = None):
    """Stage 1; with `screen_fmax` (two-pass mode) the relaxation stops at that looser fmax."""
    done = log.load()
    todo = [k for k, i in enumerate(ids) if i not in done or _may_relax_now(done[i], relax, cfg)]
    rows = {k: _static_row(ids[k], structures[k], metadata[k], cfg, band) for k in todo}
    bar = tqdm(total=len(todo), desc="evaluating", disable=not progress, unit="structure")

    def finish(k: int) -> None:
        done[ids[k]] = rows[k]
        log.append(rows[k])
        bar.update()

    # Only structurally valid structures (physical cells among them) are relaxed; the others are
    # reported with the reason, and can never be stable. So are those over the size limit.
    oversized = {k for k in todo if relax and rows[k]["struct_valid"] and _over_limit(rows[k], cfg)}
    relaxable = [k for k in todo if rows[k]["struct_valid"] and k not in oversized]
    for k in todo:
        if not rows[k]["struct_valid"] or k in oversized or not (relax or stability):
            if relax and not rows[k]["struct_valid"]:
                rows[k]["relax_error"] = _not_relaxed_reason(rows[k])
                rows[k]["relax_failure"] = relax_failure_reason(rows[k]["relax_error"])
            elif k in oversized:
                count = rows[k]["num_atoms"]
                rows[k]["relax_error"] = (f"not relaxed: {count} atoms > {cfg.max_relax_atoms} "
                                          f"(pass --max-relax-atoms {count} to relax)")
                rows[k]["relax_failure"] = TOO_MANY_ATOMS
            finish(k)
    if relax:
        pairs = [(k, structures[k]) for k in relaxable]
        steps = _StepProgress(bar, ids, rows, cfg.relax_steps) if progress else None
        for k, result, error in relax_many(
            pairs, models.relax_target, workers=cfg.workers, fmax=screen_fmax or cfg.relax_fmax,
            steps=cfg.relax_steps, batch=cfg.relax_batch, on_step=steps,
        ):
            _add_relaxation(rows[k], result, error, cfg, screen_fmax)
            finish(k)
    elif stability:
        batch = 16
        for start in range(0, len(relaxable), batch):
            chunk = relaxable[start : start + batch]
            for k, energy in zip(chunk, _single_points(models.model, [structures[k] for k in chunk])):
                if isinstance(energy, Exception):
                    rows[k]["energy_error"] = f"{type(energy).__name__}: {energy}"
                else:
                    rows[k]["energy_per_atom"] = float(energy)
                finish(k)
    bar.close()
    return done


def _over_limit(row: dict, cfg: EvaluateConfig) -> bool:
    return cfg.max_relax_atoms > 0 and row.get("num_atoms", 0) > cfg.max_relax_atoms


def _may_relax_now(row: dict, relax: bool, cfg: EvaluateConfig) -> bool:
    """A logged structure skipped for its size is redone once the limit allows it, so a rerun with
    a larger --max-relax-atoms into the same --out relaxes just those."""
    return relax and row.get("relax_failure") == TOO_MANY_ATOMS and not _over_limit(row, cfg)


def _single_points(model: Potential, structures: list[Structure]) -> list:
    """Energies per atom, or the exception, per structure: a batch that fails is redone one by one
    so that one structure the potential cannot handle costs only its own energy."""
    try:
        return list(model.energies_per_atom(structures))
    except Exception:
        out: list = []
        for structure in structures:
            try:
                out.append(model.energies_per_atom([structure])[0])
            except Exception as exc:
                out.append(exc)
        return out


class _StepProgress:
    """Relaxation steps on the progress bar: the bar counts finished structures, and one structure
    of hundreds of atoms can take many minutes, so the postfix shows the structure that last took
    a step, its step count and the steps taken in all. Called from the relaxation threads (and from
    the thread that reads the pool's step messages): updates are locked, redraws throttled."""

    REDRAW_SECONDS = 0.5

    def __init__(self, bar, ids, rows, max_steps: int):
        self.bar, self.ids, self.rows, self.max_steps = bar, ids, rows, max_steps
        self.calls: Counter = Counter()
        self.total = 0
        self.drawn = 0.0
        self.lock = threading.Lock()

    def __call__(self, k: int) -> None:
        with self.lock:
            self.calls[k] += 1
            self.total += 1
            # The first energy and forces are of the input structure; each one after is a step.
            step = self.calls[k] - 1
            atoms = self.rows[k].get("num_atoms", "?")
            self.bar.set_postfix_str(f"relaxing {self.ids[k]} ({atoms} atoms): step {step}/{self.max_steps}, "
                                     f"{self.total} steps in all", refresh=False)
            now = time.monotonic()
            if now - self.drawn >= self.REDRAW_SECONDS:
                self.drawn = now
                self.bar.refresh()


def _not_relaxed_reason(row: dict) -> str:
    if row.get("not_evaluated"):
        return row["not_evaluated"]
    if row.get("physical_cell") is False:
        return f"{NON_PHYSICAL_CELL}: {row['volume_per_atom']:.3g} Å³/atom"
    return f"structurally invalid: {row.get('struct_reason')}"


def relax_failure_reason(error: str) -> str:
    """A short category of a relaxation error, for counting."""
    for category in (NON_PHYSICAL_CELL, "relaxation ran away", "structurally invalid", "unparsable"):
        if error.startswith(category) or f": {category}" in error:
            return category
    return error.split(":", 1)[0] or "error"  # the exception's type, e.g. "RuntimeError"


def _static_row(identifier: str, structure: Structure | None, metadata: dict, cfg: EvaluateConfig,
                band: tuple[float, float]) -> dict:
    row: dict = {"id": identifier, "conditions": dict(metadata.get("conditions") or {})}
    if structure is None:
        return _not_evaluated(row, metadata.get("parse_reason") or "unparsable",
                              metadata.get("parse_error") or "no structure")
    bad = non_element_species(structure)  # given as a Structure through the API, never read here
    if bad is not None:
        return _not_evaluated(row, "unknown_element", f"{bad!r} is not a chemical element")
    try:
        row.update(_checks(structure, cfg, band))
    except Exception as exc:  # one structure that breaks a check must not stop the others
        return _not_evaluated(row, EVALUATION_ERROR, f"{type(exc).__name__}: {exc}")
    return row


def _not_evaluated(row: dict, reason: str, detail: str) -> dict:
    row.update(not_evaluated=reason, not_evaluated_detail=detail, struct_valid=False, comp_valid="unknown",
               valid=False, struct_reason=reason)
    return row


def _checks(structure: Structure, cfg: EvaluateConfig, band: tuple[float, float]) -> dict:
    structural = structural_validity(structure)
    composition = compositional_validity(structure)
    per_atom = volume_per_atom(structure)
    physical = in_band(per_atom, band)
    # Structurally valid = the CDVAE test (no atoms closer than 0.5 Å, volume > 0.1 Å³) AND a
    # physical cell: a blown-up cell has no close atoms either, but it is not a crystal.
    struct_valid = structural.valid and physical
    reason = "; ".join(r for r in (structural.reason, "" if physical else non_physical_reason(per_atom, band)) if r)
    return dict(
        formula=structure.composition.reduced_formula,
        chemical_system=chemical_system(structure),
        num_atoms=len(structure),
        num_elements=len(structure.composition.elements),
        volume=structural.volume,
        density=float(structure.density) if structural.volume > 0 else float("nan"),  # g/cm³
        min_distance=structural.min_distance,
        volume_per_atom=per_atom,
        physical_cell=physical,
        struct_valid_cdvae=structural.valid,
        struct_valid=struct_valid,
        struct_reason=reason,
        comp_valid=composition,
        valid=struct_valid and composition == VALID,
        space_group=space_group_number(structure, cfg.symprec) if struct_valid else None,
        hhi_score=hhi_score(structure),
    )


# What `_add_relaxation` adds to a row on success (a failed refinement takes them off again).
RELAXATION_KEYS = ("relaxed", "energy_per_atom", "initial_energy_per_atom", "relax_converged", "relax_steps", "rmsd",
                   "space_group_generated", "mag_density", RELAXED_KEY)


def _add_relaxation(row: dict, result: RelaxResult | None, error: str, cfg: EvaluateConfig,
                    screen_fmax: float | None = None) -> None:
    """The relaxation's result, or its failure; `screen_fmax`: the screening pass of two."""
    if screen_fmax is not None:
        row["refined"] = False
        row["relax_fmax_reached"] = screen_fmax if result is not None and result.converged else None
    if result is not None:
        relaxed = result.structure
        try:
            found = dict(
                relaxed=True,
                energy_per_atom=result.energy_per_atom,
                initial_energy_per_atom=result.initial_energy_per_atom,
                relax_converged=result.converged,
                relax_steps=result.steps,
                rmsd=result.rmsd,
                space_group=space_group_number(relaxed, cfg.symprec),
                space_group_generated=row.get("space_group"),
                mag_density=magnetic_density(relaxed, result.magmoms),
            )
        except Exception as exc:  # a relaxed structure the checks cannot read counts as not relaxed
            result, error = None, f"{type(exc).__name__}: {exc}"
        else:
            row.update(found)
            row[RELAXED_KEY] = relaxed.as_dict()
            return
    row["relax_error"] = error or "no result"
    row["relax_failure"] = relax_failure_reason(row["relax_error"])
    if screen_fmax is not None:
        row["relax_fmax_reached"] = None


# --- two-pass relaxation: refine the structures near the hull ---------------------------------------------
def refine_ceiling(rows: list[dict], cfg: EvaluateConfig) -> float:
    """The largest energy-above-hull threshold the summary reports (eV/atom): the stability
    threshold, the on-hull tolerance, or a bound of an `energy_above_hull` target."""
    bounds = [cfg.stability_threshold, ON_HULL_TOLERANCE]
    for row in rows:
        target = (row.get("conditions") or {}).get("energy_above_hull")
        if target is None:
            continue
        bounds += target_bounds("energy_above_hull", target)
    return max(b for b in bounds if math.isfinite(b))


def _refine_stage(rows, structures, evaluated, reference, scan, cfg, models, log, progress, options) -> dict:
    """Energies above the hull of the screened structures; those below `refine_ceiling` +
    `refine_window` are relaxed on to `relax_fmax` from their screened structure. Rows are updated in
    place and appended to the log as they finish. Returns the summary's two-pass entries."""
    screened = [dict(row) for row in rows]  # the hull stage's flags on a copy: only e_above_hull is used
    _hull_stage(screened, evaluated, reference, scan[1], cfg, models, [], progress, options)
    limit = refine_ceiling(rows, cfg) + cfg.refine_window
    # Not refined: failures; rows of a one-pass log (no `refined`); screens that did not converge
    # (FIRE's path does not depend on fmax: a single pass would have stopped at the same step cap);
    # structures whose stability is not assessed or whose hull lacks an element (never stable).
    due = [k for k, (row, screen) in enumerate(zip(rows, screened))
           if row.get("refined") is False and row.get("relaxed") and row.get("relax_converged")
           and not screen.get("stability_not_assessed") and isinstance(screen.get("e_above_hull"), float)
           and math.isfinite(screen["e_above_hull"]) and screen["e_above_hull"] < limit]
    if due:
        ids = [row["id"] for row in rows]
        bar = tqdm(total=len(due), desc=f"refining to fmax {cfg.relax_fmax}", disable=not progress, unit="structure")
        steps = _StepProgress(bar, ids, rows, cfg.relax_steps) if progress else None
        pairs = [(k, Structure.from_dict(rows[k][RELAXED_KEY])) for k in due]
        for k, result, error in relax_many(
            pairs, models.relax_target, workers=cfg.workers, fmax=cfg.relax_fmax, steps=cfg.relax_steps,
            batch=cfg.relax_batch, on_step=steps,
        ):
            _add_refinement(rows[k], structures[k], result, error, screened[k]["e_above_hull"], cfg)
            log.append(rows[k])
            bar.update()
        bar.close()
    screened_only = [r for r in rows if r.get("refined") is False and r.get("relaxed")]
    return {
        "relax_mode": "two-pass",
        "relax_screen_fmax": cfg.relax_screen_fmax,
        "relax_fmax": cfg.relax_fmax,
        "refine_window": cfg.refine_window,
        "refine_below_e_above_hull": limit,
        "refined_count": sum(1 for r in rows if r.get("refined") is True),
        "screened_only_count": len(screened_only),
    }


def _add_refinement(row: dict, original: Structure, result: RelaxResult | None, error: str, screen_e: float,
                    cfg: EvaluateConfig) -> None:
    """Replace a screened row's relaxation by its continuation to `relax_fmax` (steps summed, RMSD
    from the input structure), or make the row a relaxation failure."""
    row.update(screen_energy_per_atom=row["energy_per_atom"], screen_e_above_hull=screen_e,
               screen_relax_steps=row["relax_steps"])
    if result is not None:
        try:
            found = dict(
                energy_per_atom=result.energy_per_atom,
                relax_converged=result.converged,
                relax_steps=row["relax_steps"] + result.steps,
                rmsd=displacement_rmsd(original, result.structure),
                space_group=space_group_number(result.structure, cfg.symprec),
                mag_density=magnetic_density(result.structure, result.magmoms),
            )
        except Exception as exc:  # as in one pass: a structure the checks cannot read is not relaxed
            error = f"{type(exc).__name__}: {exc}"
        else:
            row.update(found, refined=True, relax_fmax_reached=cfg.relax_fmax if result.converged else None)
            row[RELAXED_KEY] = result.structure.as_dict()
            return
    generated_space_group = row.get("space_group_generated")
    for key in RELAXATION_KEYS:
        row.pop(key, None)
    row.update(space_group=generated_space_group, refined=False, relax_fmax_reached=None,
               relax_error=error or "no result")
    row["relax_failure"] = relax_failure_reason(row["relax_error"])


def _evaluated_structure(row: dict, structure: Structure | None) -> Structure | None:
    """The structure that set-level checks judge: the relaxed one when there is one; None for a
    structure that could not be evaluated (it is neither unique nor novel nor on any hull)."""
    if row.get("not_evaluated"):
        return None
    if row.get(RELAXED_KEY):
        return Structure.from_dict(row[RELAXED_KEY])
    return structure


class _ResultLog:
    """Append-only JSONL of per-structure results (fsynced per line); None path = in memory."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None

    def load(self) -> dict[str, dict]:
        if self.path is None or not self.path.exists():
            return {}
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-line: drop the fragment
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        rows = {}
        for line in data.decode().splitlines():
            row = json.loads(line)
            rows[row["id"]] = row
        return rows

    def append(self, row: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# --- stage 2: over the set --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _HullOptions:
    hull: str | Path | None = None  # a file of published entries (the hull), else the reference set
    allow_elements_only: bool = False  # assess stability even when the hull has only elements
    relaxed: bool = True  # energies come from relaxations: only relaxed structures can be stable

    def assesses(self, reference) -> bool:
        """Whether stability will be judged (see `_hull_stage`): a hull, a reference set, or consent."""
        return self.hull is not None or reference is not None or self.allow_elements_only


ELEMENTS_ONLY_REASON = (
    "no hull of real compounds: only elemental references (give --hull FILE, e.g. from "
    "`xtalgen data download mp_hull`, or --reference TRAINING_SET; or --allow-elements-only-hull)"
)


def _set_stage(rows, evaluated, reference, stability, cfg, models, progress, hull_options=_HullOptions(),
               scan=None) -> dict:
    settings = MatchSettings(cfg.ltol, cfg.stol, cfg.angle_tol)
    present = [k for k, s in enumerate(evaluated) if s is not None]
    notes: list[str] = []
    if cfg.matching:
        first = duplicate_of([evaluated[k] for k in present], settings, cfg.workers)
        for row in rows:
            row["unique"] = False
        for position, k in enumerate(present):
            rows[k]["unique"] = first[position] == position
            rows[k]["duplicate_of"] = rows[present[first[position]]]["id"]
    else:
        notes.append("uniqueness, novelty and SUN not assessed: structure matching is off (evaluate.matching=false)")

    # Relaxation keeps compositions: a scan made for the screened structures holds for the refined.
    index, hull_candidates = scan or _reference_scan(reference, evaluated, stability, hull_options, progress)
    if index is not None and cfg.matching:
        novel = novel_flags([evaluated[k] for k in present], index, settings, cfg.workers)
        for row in rows:
            row["novel"] = False
        for k, flag in zip(present, novel):
            rows[k]["novel"] = flag
    elif index is None:
        notes.append("novelty not computed: no reference set given (--reference)")

    assessment = None
    if stability:
        assessment = _hull_stage(rows, evaluated, reference, hull_candidates, cfg, models, notes, progress,
                                 hull_options)
    else:
        notes.append("stability not computed (no relaxation / energies requested)")
    _property_stage(rows, evaluated, cfg, models)
    return _summary(rows, reference_size=index.size if index is not None else None, notes=notes, cfg=cfg,
                    assessment=assessment)


def _reference_scan(reference, evaluated, stability, hull_options, progress):
    """(novelty index, hull candidates) of the reference, for these structures' formulas and systems."""
    reference_items = _reference_items(reference) if reference is not None else None
    systems = {_system(s) for s in evaluated if s is not None}
    # With a hull file, the reference set is for novelty only (its structures are not relaxed).
    scan_hull = stability and hull_options.hull is None
    return _scan_reference(reference_items, evaluated, systems, scan_hull, progress)


def _reference_items(reference):
    """(id, structure) pairs of the reference, streamed from disk or taken from a list."""
    if isinstance(reference, (str, os.PathLike)):
        return ((item.id, item.structure) for item in iter_structures(reference) if item.structure is not None)
    items = []
    for i, item in enumerate(reference):
        if isinstance(item, CrystalRecord):
            items.append((item.id, item.to_structure()))
        elif isinstance(item, InputStructure):
            items.append((item.id, item.structure))
        else:
            items.append((str(i), item))
    return items


def _scan_reference(items, evaluated, systems, stability, progress):
    """One pass over the reference: an index for novelty (formulas that occur in the set only) and
    the reference structures whose chemical system lies inside an evaluated one (for the hull)."""
    if items is None:
        return None, []
    formulas = {s.composition.reduced_formula for s in evaluated if s is not None}
    subsystems = _all_subsystems(systems) if stability else set()
    index = ReferenceIndex()
    candidates = []
    for identifier, structure in tqdm(items, desc="reading reference", disable=not progress, unit="structure"):
        index.add(structure, formulas)
        if _system(structure) in subsystems:
            candidates.append((identifier, structure))
    return index, candidates


def _system(structure: Structure) -> frozenset[str]:
    return frozenset(el.symbol for el in structure.composition.elements)


def _all_subsystems(systems) -> set[frozenset]:
    out: set[frozenset] = set()
    for system in systems:
        elements = sorted(system)
        for mask in range(1, 1 << len(elements)):
            out.add(frozenset(e for b, e in enumerate(elements) if mask >> b & 1))
    return out


BARE_SYSTEM_REASON = "no compound of its chemical system in the hull (elements only)"


def _hull_stage(rows, evaluated, reference, candidates, cfg, models, notes, progress, options) -> dict:
    """Energies above the hull, stable and SUN flags; returns {"assessed", "reason", "source"}."""
    with_energy = [k for k, row in enumerate(rows) if row.get("energy_per_atom") is not None]
    if options.hull is None and reference is None and not options.allow_elements_only:
        for row in rows:  # not assessed: neither stable nor unstable
            row["stable"] = row["on_or_below_hull"] = None
            if "novel" in row:
                row["sun"] = None
        return {"assessed": False, "reason": ELEMENTS_ONLY_REASON, "source": None}
    elements = sorted({el.symbol for k in with_energy for el in evaluated[k].composition.elements})
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else hull_lib.default_cache_dir()
    compositions: list = []
    energies: list[float] = []
    if options.hull is not None:
        source = _hull_file_entries(options.hull, evaluated, with_energy, cache_dir, models, notes, progress,
                                    compositions, energies)
    else:
        if cfg.elemental_reference:
            elemental = hull_lib.load_elemental_entries(cfg.elemental_reference)
            notes.append(f"elemental references from {cfg.elemental_reference}")
        elif elements:
            computed = hull_lib.compute_elemental_references(
                elements, models.model, cache_dir, fmax=cfg.relax_fmax, steps=cfg.relax_steps,
                workers=cfg.workers, batch=cfg.relax_batch, progress=progress,
            )
            elemental = {s: v["energy_per_atom"] for s, v in computed.items()}
            notes.append(f"elemental references: built-in prototypes relaxed with {cfg.potential}")
        else:
            elemental = {}
        compositions += [Composition({s: 1}) for s in elemental]
        energies += list(elemental.values())
        if reference is not None:
            source = f"reference set relaxed with {cfg.potential}" if cfg.reference_relax else \
                f"reference set, single-point energies with {cfg.potential}"
            for composition, energy in _reference_energies(reference, candidates, cfg, models, cache_dir, progress):
                compositions.append(composition)
                energies.append(energy)
        else:
            source = "elemental references only (allowed by --allow-elements-only-hull)"
            notes.append("hull from elemental references only: energies above it are formation energies")
    compound_systems = {frozenset(el.symbol for el in Composition(c).elements) for c in compositions}
    compound_systems = {system for system in compound_systems if len(system) > 1}
    # A structure whose chemical system (and every subsystem) holds no compound of the hull is judged
    # against the elements alone: "stable" would only mean a negative formation energy. Unless an
    # elements-only hull is accepted, such a structure is not assessed and counts as not stable.
    bare = {k for k in with_energy
            if len(_system(evaluated[k])) > 1 and not _all_subsystems({_system(evaluated[k])}) & compound_systems}
    if bare and (options.hull is not None or reference is not None):
        if options.allow_elements_only:
            notes.append(f"{len(bare)} of {len(with_energy)} structures lie in chemical systems without any "
                         "reference compound: their hull is the elements alone (accepted by "
                         "--allow-elements-only-hull), so 'stable' there means a negative formation energy")
        else:
            notes.append(f"{len(bare)} of {len(with_energy)} structures lie in chemical systems without any "
                         "reference compound: their stability is not assessed and they count as not stable")
            for k in bare:
                rows[k]["stability_not_assessed"] = BARE_SYSTEM_REASON
    hull = hull_lib.ConvexHullReference(compositions, energies)
    for k in with_energy:
        row, composition = rows[k], evaluated[k].composition
        e_hull = hull.e_above_hull(composition, row["energy_per_atom"])
        row["e_above_hull"] = e_hull
        row["formation_energy_per_atom"] = hull.formation_energy_per_atom(composition, row["energy_per_atom"])
        # Only a structure that was relaxed (when relaxation was asked for) can be stable.
        judged = math.isfinite(e_hull) and (row.get("relaxed") or not options.relaxed)
        if "stability_not_assessed" in row:
            row["stable"] = row["on_or_below_hull"] = None
        elif judged:
            row["stable"] = e_hull < cfg.stability_threshold
            row["on_or_below_hull"] = e_hull <= ON_HULL_TOLERANCE
    missing = sum(1 for k in with_energy if not math.isfinite(rows[k]["e_above_hull"]))
    if missing:
        notes.append(f"{missing} structure(s) have an element without a hull reference: counted as not stable")
    for row in rows:
        row.setdefault("stable", False)
        row.setdefault("on_or_below_hull", False)
        if "novel" in row:
            row["sun"] = None if row["stable"] is None else bool(row["stable"] and row["unique"] and row["novel"])
    return {"assessed": True, "reason": None, "source": source}


def _hull_file_entries(path, evaluated, with_energy, cache_dir, models, notes, progress, compositions, energies) -> str:
    """Add the hull file's entries in the evaluated chemical systems; returns the hull's description."""
    systems = _all_subsystems({_system(evaluated[k]) for k in with_energy})
    hull_file = path if isinstance(path, hull_lib.HullFile) else hull_lib.HullFile.load(path, cache_dir, progress)
    path, rows = hull_file.path, hull_file.rows
    used = 0
    for row in rows:
        if frozenset(row["composition"]) in systems:
            compositions.append(Composition(row["composition"]))
            energies.append(row["energy_per_atom"])
            used += 1
    footing = getattr(models.model, "energy_footing", "unknown") if with_energy else MP2020_FOOTING
    if footing != MP2020_FOOTING:
        notes.append(f"the hull file holds MP2020-corrected GGA/GGA+U energies but potential "
                     f"{models.model.name!r} is fitted to {footing}: energies above hull may be off")
    return f"hull file {path} ({len(rows)} GGA/GGA+U entries, {used} in the evaluated systems)"


def _reference_energies(reference, candidates, cfg, models, cache_dir, progress):
    """(composition, energy per atom) of reference structures, from the cache or computed now."""
    key = hull_lib.reference_key(reference) if isinstance(reference, (str, os.PathLike)) else _list_key(reference)
    mode = "relax" if cfg.reference_relax else "single_point"
    store = hull_lib.ReferenceEnergyStore(cache_dir / "references" / key / f"{cfg.potential}-{mode}.jsonl")
    cached = store.load()
    todo = [(i, s) for i, s in candidates if i not in cached]
    if todo:
        bar = tqdm(total=len(todo), desc=f"reference energies ({mode})", disable=not progress)
        if cfg.reference_relax:
            by_position = dict(enumerate(todo))
            pairs = [(p, s) for p, (_, s) in by_position.items()]
            results = relax_many(pairs, models.relax_target, workers=cfg.workers, fmax=cfg.relax_fmax,
                                 steps=cfg.relax_steps, batch=cfg.relax_batch)
            for position, result, _error in results:
                identifier, structure = by_position[position]
                energy = result.energy_per_atom if result is not None else float("nan")
                cached[identifier] = _store_row(store, identifier, structure, energy)
                bar.update()
        else:
            for identifier, structure in todo:
                energy = models.model.energies_per_atom([structure])[0]
                cached[identifier] = _store_row(store, identifier, structure, energy)
                bar.update()
        bar.close()
    for identifier, _ in candidates:
        row = cached[identifier]
        if row["energy_per_atom"] is not None:
            yield Composition(row["composition"]), float(row["energy_per_atom"])


def _store_row(store, identifier: str, structure: Structure, energy: float) -> dict:
    row = {
        "id": identifier,
        "composition": structure.composition.as_dict(),
        "energy_per_atom": float(energy) if math.isfinite(energy) else None,
    }
    store.append(row)
    return row


def _list_key(reference) -> str:
    digest = hashlib.sha256()
    for identifier, structure in _reference_items(reference):
        digest.update(identifier.encode())
        digest.update(json.dumps(structure.as_dict(), sort_keys=True, default=_json_default).encode())
    return digest.hexdigest()


def _property_stage(rows, evaluated, cfg, models) -> None:
    for row, structure in zip(rows, evaluated):
        for name, target in (row.get("conditions") or {}).items():
            value = _proxy_value(name, row, structure, models)
            row[f"value_{name}"] = value
            row[f"meets_{name}"] = meets_target(name, target, value)


def _proxy_value(name: str, row: dict, structure: Structure | None, models):
    if structure is None:
        return None
    if name == "chemical_system":
        return row.get("chemical_system")
    if name == "space_group":
        return row.get("space_group")
    if name == "hhi_score":
        return row.get("hhi_score")
    if name == "dft_mag_density":
        return row.get("mag_density")
    if name == "energy_above_hull":
        return row.get("e_above_hull")
    if name in ("dft_bulk_modulus", "ml_bulk_modulus") and row.get("relaxed"):
        return bulk_modulus(structure, models.model)
    return None  # e.g. dft_band_gap: no predictor available


# --- summary ----------------------------------------------------------------------------------------
def _summary(rows: list[dict], reference_size: int | None, notes: list[str], cfg: EvaluateConfig,
             assessment: dict | None = None) -> dict:
    n = len(rows)

    def rate(key: str, value=True) -> float:
        return sum(1 for r in rows if r.get(key) == value) / n if n else float("nan")

    def values(key: str) -> list[float]:
        return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                and math.isfinite(r[key])]

    def mean(key: str) -> float:
        found = values(key)
        return float(np.mean(found)) if found else float("nan")

    per_atom = values("volume_per_atom")
    # Logs written before `not_evaluated` existed marked unreadable structures by struct_reason alone.
    not_evaluated = Counter(r.get("not_evaluated") or "unparsable" for r in rows
                            if r.get("not_evaluated") or r.get("struct_reason") == "unparsable")
    summary = {
        "num_structures": n,
        "evaluated_count": n - sum(not_evaluated.values()),
        "not_evaluated_count": sum(not_evaluated.values()),  # rows with a reason, in the rates as failures
        "not_evaluated_reasons": dict(sorted(not_evaluated.items(), key=lambda kv: (-kv[1], kv[0]))),
        "physical_cell_rate": rate("physical_cell"),
        "volume_per_atom_median": float(np.median(per_atom)) if per_atom else None,
        "volume_per_atom_max": max(per_atom) if per_atom else None,
        "struct_valid_rate": rate("struct_valid"),
        "struct_valid_cdvae_rate": rate("struct_valid_cdvae"),
        "comp_valid_rate": rate("comp_valid", "valid"),
        "comp_unknown_rate": rate("comp_valid", "unknown"),
        "valid_rate": rate("valid"),
        "unique_rate": rate("unique") if cfg.matching else None,
        "novel_rate": rate("novel") if reference_size is not None and cfg.matching else None,
        "reference_size": reference_size,
        "potential": cfg.potential,
        "stability_threshold": cfg.stability_threshold,
    }
    if assessment is not None:
        assessed = assessment["assessed"]
        summary.update(
            stability_assessed=assessed,
            stability_not_assessed_reason=assessment["reason"],
            hull_source=assessment["source"],
            stable_rate=rate("stable") if assessed else None,  # over all structures: not assessed = not stable
            stability_not_assessed_count=sum(1 for r in rows if r.get("stability_not_assessed")),
            on_or_below_hull_rate=rate("on_or_below_hull") if assessed else None,
            sun_rate=rate("sun") if assessed and reference_size is not None and cfg.matching else None,
            mean_e_above_hull=mean("e_above_hull") if assessed else None,
            mean_energy_per_atom=mean("energy_per_atom"),
        )
    relax_requested = any("relaxed" in r or "relax_error" in r for r in rows)
    if relax_requested:
        rmsd = values("rmsd")
        reasons = Counter(r["relax_failure"] for r in rows if r.get("relax_failure"))
        summary.update(
            relaxed_count=sum(1 for r in rows if r.get("relaxed")),
            relax_converged_rate=rate("relax_converged"),
            relax_failures=sum(reasons.values()),  # structures not relaxed: never stable, never SUN
            relax_failure_reasons=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            mean_rmsd=float(np.mean(rmsd)) if rmsd else float("nan"),
            rmsd_median=float(np.median(rmsd)) if rmsd else None,
            rmsd_p90=float(np.percentile(rmsd, 90)) if rmsd else None,
            rmsd_max=max(rmsd) if rmsd else None,
        )
    targets = sorted({name for r in rows for name in (r.get("conditions") or {})})
    for name in targets:
        judged = [r[f"meets_{name}"] for r in rows if r.get(f"meets_{name}") is not None]
        summary[f"meets_{name}_rate"] = float(np.mean(judged)) if judged else None
        summary[f"judged_{name}"] = len(judged)
    summary["notes"] = notes
    return summary


def _unique_ids(ids: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for identifier in ids:
        count = seen.get(identifier, 0)
        seen[identifier] = count + 1
        out.append(identifier if count == 0 else f"{identifier}#{count}")
    return out


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
