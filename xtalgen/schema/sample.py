"""Config of sampling and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SampleConfig:
    checkpoint: str = ""
    out: str = "samples"
    num_samples: int = 16
    batch_size: int = 16
    num_steps: int = 1000  # MatterGen default
    corrector_steps: int = 1
    coord_snr: float = 0.4  # MatterGen Langevin corrector
    lattice_snr: float = 0.2
    eta: float = 1.0  # predictor noise: 1 = ancestral (MatterGen), 0 = deterministic DDIM step
    # ancestral (MatterGen; `eta` applies) | heun (2nd-order ODE step, 2 evaluations)
    predictor: Literal["ancestral", "heun"] = "ancestral"
    time_power: float = 1.0  # time grid t_i = eps + (1 - eps)(1 - i/(S-1))^power; 1 = uniform (MatterGen)
    guidance_scale: float = 1.0  # classifier-free guidance gamma; 1 = conditional only
    num_atoms: int = 0  # 0 = drawn from the training histogram
    conditions: dict[str, str] = field(default_factory=dict)
    # Space-group constrained sampling (models/symmetry.py, sampling/templates.py): every structure
    # is made under the symmetry of one structure of this space group (1-230) drawn from
    # `templates` (a shard set, a CSV with a `cif` column, CIFs or extxyz: training structures),
    # whose Wyckoff orbits also fix its atom count. 0 = unconstrained.
    space_group: int = 0
    templates: str = ""
    seed: int = 0
    # torch.compile the score network's layers (`models.score_net.compile_layers`): ~2x faster per
    # structure on CPU after a one-time compilation of 10-60 s; samples then agree with the eager
    # run's in distribution, not bit for bit. Worth it from a few hundred structures on.
    compile: bool = False


@dataclass
class EvaluateConfig:
    potential: str = "chgnet"
    relax: bool = True
    relax_steps: int = 500
    relax_fmax: float = 0.05  # eV/Å: what every structure near the hull is relaxed to
    # Two-pass relaxation (opt-in; see evaluation/pipeline.py): every structure is first relaxed to
    # this looser fmax (e.g. 0.1); energies above the hull are computed, and only the structures whose
    # screening e_above_hull lies below the largest reported threshold (stability_threshold, or an
    # energy_above_hull target) plus `refine_window` are relaxed on to `relax_fmax` from there.
    # None, 0 or a value not larger than `relax_fmax` = one pass to `relax_fmax` for every structure.
    # Not the default: on Perov-5 it saved 18 % of the relaxation steps but only 10 % of the CPU, and
    # lost stable structures that stop at a saddle at the loose fmax (benchmarks/RESULTS.md).
    relax_screen_fmax: float | None = None
    # eV/atom above the largest threshold. Continuing 0.1 -> 0.05 eV/Å lowered 93 % of Perov-5 test
    # structures by less than this (median 0.6 meV/atom), but a few by up to 1.7 eV/atom.
    refine_window: float = 0.2
    stability_threshold: float = 0.1  # eV/atom above hull
    ltol: float = 0.2  # StructureMatcher, MatterGen settings
    stol: float = 0.3
    angle_tol: float = 5.0
    # Uniqueness and novelty by StructureMatcher. It compares every pair of one reduced formula, so a
    # set of one formula (Carbon-24: all carbon) costs N^2 / 2 + N x reference fits at ~15 ms each:
    # hours for 1,000 samples. False reports both (and SUN) as not assessed, with the reason.
    matching: bool = True
    workers: int = 1
    device: str = "cpu"  # where the potential runs
    cache_dir: str = ""  # reference energies cache; "" = $XTALGEN_CACHE or ~/.cache/xtalgen
    elemental_reference: str = ""  # ComputedEntry dicts (json[.gz]); "" = built in, same potential
    reference_relax: bool = True  # relax reference structures (False: single-point energies)
    symprec: float = 0.1  # Å, spglib tolerance for space groups
    relax_batch: int = 8  # structures relaxed together per process (one batched model call per step)
    # Larger structures are not relaxed unless asked (`--max-relax-atoms N`, 0 = no limit): CHGNet
    # takes minutes per relaxation of a few hundred atoms on a CPU, and generated cells hold ~20.
    max_relax_atoms: int = 200
    # Convex-hull entries (`xtalgen data download mp_hull`) for stability and SUN; also what periodic
    # sampling in training scores against. "" = none: stability is then "not assessed" unless a
    # reference set gives real compounds, or `allow_elements_only_hull` accepts an elements-only hull.
    hull: str = ""
    allow_elements_only_hull: bool = False


def validate_evaluate(evaluate: EvaluateConfig, fail: Callable[[str, str], Exception]) -> None:
    """What the types cannot check; `fail(key, message)` makes the exception to raise."""
    if not evaluate.relax_fmax > 0:
        raise fail("evaluate.relax_fmax", f"must be > 0 eV/Å, got {evaluate.relax_fmax}")
    if evaluate.relax_screen_fmax is not None and not evaluate.relax_screen_fmax >= 0:
        raise fail("evaluate.relax_screen_fmax", f"must be >= 0 eV/Å (null or 0: one pass), "
                   f"got {evaluate.relax_screen_fmax}")
    if not evaluate.refine_window >= 0:
        raise fail("evaluate.refine_window", f"must be >= 0 eV/atom, got {evaluate.refine_window}")
