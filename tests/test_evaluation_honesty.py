"""The evaluator does not hide blown-up cells, failed relaxations or a missing hull.

Fast: no CHGNet here. A stand-in potential returns known energies and RMSDs (and fails on
demand), and a small hull is written from pymatgen ComputedEntry dicts, so every number below is
known in advance. The CHGNet versions of these checks are in test_evaluation_relax.py.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.entries.computed_entries import ComputedEntry, ConstantEnergyAdjustment

from xtalgen.evaluation import evaluate_structures
from xtalgen.evaluation.hull import iter_entry_dicts, load_hull_entries
from xtalgen.evaluation.physical import (
    DEFAULT_VOLUME_PER_ATOM_BAND,
    REFERENCE_BAND_MARGIN,
    RelaxationRunaway,
    check_relaxation_volume,
)
from xtalgen.evaluation.pipeline import ELEMENTS_ONLY_REASON
from xtalgen.evaluation.relax import MP2020_FOOTING, Potential, RelaxResult
from xtalgen.schema import EvaluateConfig


def rock_salt(a: float, species=("Na", "Cl")) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), list(species), [[0, 0, 0], [0.5, 0.5, 0.5]])


def blown_up(structure: Structure, per_atom: float) -> Structure:
    out = structure.copy()
    out.scale_lattice(per_atom * len(out))
    return out


class StandInPotential(Potential):
    """Known energies (eV/atom by reduced formula) and RMSDs; fails on a cell with a == `fail_at`."""

    name = "stand-in"
    energy_footing = MP2020_FOOTING

    def __init__(self, energies: dict[str, float], rmsd: dict[str, float], fail_at: float = np.nan):
        self.energies, self.rmsd, self.fail_at = energies, rmsd, fail_at
        self.relaxed: list[str] = []

    def energies_per_atom(self, structures):
        return [self.energies[s.composition.reduced_formula] for s in structures]

    def relax(self, structure, fmax=0.05, steps=500, relax_cell=True):
        formula = structure.composition.reduced_formula
        self.relaxed.append(formula)
        if abs(structure.lattice.abc[0] - self.fail_at) < 1e-6:
            raise RuntimeError("the potential gave NaN forces")
        return RelaxResult(structure=structure.copy(), energy_per_atom=self.energies[formula],
                           initial_energy_per_atom=self.energies[formula] + 0.1, converged=True, steps=3,
                           rmsd=self.rmsd[formula])


def _entry(formula: str, energy: float, adjustment: float = 0.0, run_type: str = "GGA", entry_id: str = "") -> dict:
    adjustments = [ConstantEnergyAdjustment(adjustment)] if adjustment else []
    return ComputedEntry(Composition(formula), energy, energy_adjustments=adjustments,
                         parameters={"run_type": run_type}, entry_id=entry_id or formula).as_dict()


def hull_entries() -> list[dict]:
    """Na at -1.3, Cl at -1.8 eV/atom; NaCl at -3.0 eV/atom as computed, -3.3 with its MP2020-style
    correction (-0.6 eV per formula unit); an r2SCAN NaCl far lower, which must be ignored."""
    return [
        _entry("Na", -1.3),
        _entry("Cl2", -3.6),
        _entry("NaCl", -6.0, adjustment=-0.6),
        _entry("NaCl", -10.0, run_type="R2SCAN", entry_id="NaCl-r2scan"),
    ]


@pytest.fixture
def hull_file(tmp_path):
    """The entries as Matbench Discovery lays them out: a gzipped pandas frame with an `entry` column."""
    entries = hull_entries()
    frame = {"material_id": {str(i): e["entry_id"] for i, e in enumerate(entries)},
             "entry": {str(i): e for i, e in enumerate(entries)}}
    path = tmp_path / "hull.json.gz"
    with gzip.open(path, "wt") as handle:
        json.dump(frame, handle)
    return path


# --- physical cells -------------------------------------------------------------------------------
def test_blown_up_cell_is_not_physical_nor_structurally_valid():
    real = rock_salt(5.64)  # 22.4 Å³/atom
    huge = blown_up(real, 322.0)  # the smallest blow-up seen from early models
    rows, summary = evaluate_structures([real, huge])
    assert DEFAULT_VOLUME_PER_ATOM_BAND == (5.0, 60.0)
    assert summary["physical_volume_per_atom_band"] == [5.0, 60.0]
    assert rows[0]["physical_cell"] and rows[0]["struct_valid"] and rows[0]["valid"]
    assert rows[1]["volume_per_atom"] == pytest.approx(322.0)
    # The CDVAE test alone passes it (no atoms closer than 0.5 Å), which is what hid blow-ups.
    assert rows[1]["struct_valid_cdvae"] is True
    assert rows[1]["physical_cell"] is False and rows[1]["struct_valid"] is False and rows[1]["valid"] is False
    assert "non-physical cell: 322 Å³/atom outside [5, 60]" in rows[1]["struct_reason"]
    assert summary["physical_cell_rate"] == 0.5 and summary["struct_valid_rate"] == 0.5
    assert summary["struct_valid_cdvae_rate"] == 1.0
    assert summary["volume_per_atom_max"] == pytest.approx(322.0)


def test_band_follows_the_reference_set(perov_val):
    frame = pd.read_csv(perov_val, nrows=10)
    reference = [Structure.from_str(c, fmt="cif") for c in frame["cif"]]
    per_atom = [s.volume / len(s) for s in reference]
    low, high = min(per_atom) * (1 - REFERENCE_BAND_MARGIN), max(per_atom) * (1 + REFERENCE_BAND_MARGIN)
    # Just inside and just outside each end of the reference's band.
    probes = [blown_up(reference[0], v) for v in (low * 1.01, low * 0.99, high * 0.99, high * 1.01)]
    rows, summary = evaluate_structures(probes, reference=reference)
    assert summary["physical_volume_per_atom_band"] == pytest.approx([low, high])
    assert [r["physical_cell"] for r in rows] == [True, False, True, False]


def test_runaway_guard_judges_the_change_not_the_start():
    check_relaxation_volume(400.0, 400.0 * 3.9)  # a large cell that stays put is not a runaway
    check_relaxation_volume(20.0, 20.0 / 3.9)
    with pytest.raises(RelaxationRunaway, match="from 20 to 81 Å³ per atom"):
        check_relaxation_volume(20.0, 81.0)
    with pytest.raises(RelaxationRunaway):
        check_relaxation_volume(20.0, 4.9)
    with pytest.raises(RelaxationRunaway):
        check_relaxation_volume(20.0, float("nan"))


# --- relaxation failures, RMSD, stability against a hull file ---------------------------------------
def test_failures_counted_rmsd_distribution_and_hull_with_corrections(hull_file, tmp_path):
    structures = [
        rock_salt(5.64),                      # relaxed; 0.05 eV/atom above the corrected hull: stable
        rock_salt(6.29, ("K", "Cl")),         # relaxed; no K in the hull: not judged, not stable
        rock_salt(5.70),                      # the potential fails: never stable
        blown_up(rock_salt(5.64), 500.0),     # non-physical: not relaxed at all
    ]
    potential = StandInPotential({"NaCl": -3.25, "KCl": -3.0}, {"NaCl": 0.1, "KCl": 0.3}, fail_at=5.70)
    cfg = EvaluateConfig(cache_dir=str(tmp_path / "cache"))
    rows, summary = evaluate_structures(structures, relax=True, cfg=cfg, potential=potential, hull=hull_file)
    assert potential.relaxed == ["NaCl", "KCl", "NaCl"]  # the blown-up cell never reached the potential
    assert [r.get("relaxed", False) for r in rows] == [True, True, False, False]
    assert rows[2]["relax_failure"] == "RuntimeError" and "NaN forces" in rows[2]["relax_error"]
    assert rows[3]["relax_failure"] == "non-physical cell"
    assert summary["relax_failures"] == 2
    assert summary["relax_failure_reasons"] == {"RuntimeError": 1, "non-physical cell": 1}
    assert summary["rmsd_median"] == pytest.approx(0.2)
    assert summary["rmsd_p90"] == pytest.approx(0.28)
    assert summary["rmsd_max"] == pytest.approx(0.3)
    # Hull at NaCl: the corrected -3.3 eV/atom (not -3.0 as computed, not the r2SCAN entry).
    assert rows[0]["e_above_hull"] == pytest.approx(0.05)
    assert rows[0]["stable"] is True and rows[0]["on_or_below_hull"] is False
    assert math.isnan(rows[1]["e_above_hull"]) and rows[1]["stable"] is None  # K-Cl: no compound, not assessed
    assert rows[2]["stable"] is False and rows[3]["stable"] is False
    assert summary["stability_assessed"] is True and summary["stable_rate"] == 0.25
    assert "hull file" in summary["hull_source"] and "3 GGA/GGA+U entries" in summary["hull_source"]
    assert summary["sun_rate"] is None  # no reference set: novelty, and so SUN, unknown


@pytest.mark.parametrize("accept", [False, True])
def test_a_system_with_no_compound_in_the_hull_is_not_assessed(tmp_path, accept):
    """KCl against a hull with K and Cl but no K-Cl compound: only its formation energy is known."""
    path = tmp_path / "hull.json"
    path.write_text(json.dumps(hull_entries() + [_entry("K", -1.1)]))
    structures = [rock_salt(5.64), rock_salt(6.29, ("K", "Cl")), rock_salt(5.5, ("Na", "Na"))]
    potential = StandInPotential({"NaCl": -3.25, "KCl": -3.0, "Na": -1.3}, {"NaCl": 0.1, "KCl": 0.3, "Na": 0.0})
    cfg = EvaluateConfig(cache_dir=str(tmp_path / "cache"))
    rows, summary = evaluate_structures(structures, relax=True, cfg=cfg, potential=potential, hull=path,
                                        allow_elements_only_hull=accept)
    assert rows[0]["stable"] is True  # NaCl has its compound in the hull
    assert rows[2]["stable"] is True and rows[2]["e_above_hull"] == pytest.approx(0.0)  # an element: its own hull
    if accept:  # judged against the elements alone: E_form = -3.0 - (-1.1 - 1.8) / 2 = -1.55 eV/atom
        assert rows[1]["stable"] is True and rows[1]["e_above_hull"] == pytest.approx(-1.55)
        assert summary["stability_not_assessed_count"] == 0 and summary["stable_rate"] == 1.0
    else:
        assert rows[1]["stable"] is None and "no compound" in rows[1]["stability_not_assessed"]
        assert summary["stability_not_assessed_count"] == 1
        assert summary["stable_rate"] == pytest.approx(2 / 3)  # not assessed counts as not stable


def test_without_a_hull_of_compounds_stability_is_not_assessed(perov_val, shared_data, tmp_path):
    frame = pd.read_csv(shared_data / "perov_5" / "test.csv", nrows=3)
    structures = [Structure.from_str(c, fmt="cif") for c in frame["cif"]]  # real DFT-relaxed compounds
    energies = {s.composition.reduced_formula: -7.0 for s in structures}  # far below their elements
    potential = StandInPotential(energies, dict.fromkeys(energies, 0.0))
    cfg = EvaluateConfig(cache_dir=str(tmp_path), elemental_reference=str(
        shared_data / "mp_reference" / "mp_elemental_reference_entries.json.gz"))
    rows, summary = evaluate_structures(structures, relax=True, cfg=cfg, potential=potential)
    assert summary["stability_assessed"] is False
    assert summary["stable_rate"] is None and summary["on_or_below_hull_rate"] is None
    assert summary["stability_not_assessed_reason"] == ELEMENTS_ONLY_REASON
    assert all(r["stable"] is None and "e_above_hull" not in r for r in rows)
    # Asked for explicitly, the elements-only hull gives the flattering number it used to print.
    _, allowed = evaluate_structures(structures, relax=True, cfg=cfg, potential=potential,
                                     allow_elements_only_hull=True)
    assert allowed["stability_assessed"] is True and allowed["stable_rate"] == 1.0
    assert allowed["hull_source"].startswith("elemental references only")


# --- hull files --------------------------------------------------------------------------------------
def test_hull_file_layouts_stream_and_cache(hull_file, tmp_path):
    entries = hull_entries()
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(entries))
    as_lines = tmp_path / "lines.jsonl.gz"
    with gzip.open(as_lines, "wt") as handle:
        handle.writelines(json.dumps(e) + "\n" for e in entries)
    for path in (hull_file, as_list, as_lines):
        assert [e["entry_id"] for e in iter_entry_dicts(path)] == ["Na", "Cl2", "NaCl", "NaCl-r2scan"]
        rows = load_hull_entries(path)
        assert [r["id"] for r in rows] == ["Na", "Cl2", "NaCl"]
        assert [r["energy_per_atom"] for r in rows] == pytest.approx([-1.3, -1.8, -3.3])
    cache = tmp_path / "cache"
    first = load_hull_entries(hull_file, cache)
    assert len(list((cache / "hull").glob("*.jsonl.gz"))) == 1
    assert load_hull_entries(hull_file, cache) == first
    broken = tmp_path / "broken.json"
    broken.write_text('{"entry": {"0": {"energy": ')
    with pytest.raises(ValueError, match="not a JSON file of ComputedEntry dicts"):
        load_hull_entries(broken)


# --- plots ------------------------------------------------------------------------------------------
def test_plots_state_their_counts():
    from xtalgen.evaluation.plots import (
        E_HULL_BIN,
        E_HULL_RANGE,
        e_above_hull_figure,
        element_frequencies_figure,
    )

    values = [0.01, 0.02, 0.03, 0.35, 0.36, 5.0, float("nan")]
    rows = [{"e_above_hull": v, "chemical_system": "Na-Cl"} for v in values] + [{"struct_reason": "unparsable"}]
    fig = e_above_hull_figure(rows, threshold=0.1)
    ax = fig.axes[0]
    assert ax.get_title() == "Energy above hull (n = 6 of 8 structures with an energy above hull)"
    labels = [t.get_text() for t in ax.texts if t.get_text()]
    edges = np.linspace(*E_HULL_RANGE, int(round((E_HULL_RANGE[1] - E_HULL_RANGE[0]) / E_HULL_BIN)) + 1)
    expected, _ = np.histogram(np.clip(values[:6], *E_HULL_RANGE), bins=edges)
    assert labels == [str(c) for c in expected if c] == ["3", "2", "1"]
    assert "stable < 0.1 eV/atom: 3" in [t.get_text() for t in ax.get_legend().get_texts()]
    fig = element_frequencies_figure(rows)
    assert fig.axes[0].get_title() == "Element frequencies (n = 7 of 8 structures that could be read)"
    assert [t.get_text() for t in fig.axes[0].texts] == ["7", "7"]


# --- the command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "empty", "empty_samples"])
def test_cli_without_structures_is_a_one_line_error(tmp_path, case):
    source = tmp_path / "input"
    if case == "empty":
        source.mkdir()
    elif case == "empty_samples":
        source.mkdir()
        (source / "samples.jsonl").write_text("")
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "xtalgen.cli", "evaluate", str(source), "--out", str(out),
                             "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("xtalgen evaluate: error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()  # no settings.json, nothing at all


def test_cli_missing_hull_file_is_a_one_line_error(perov_val, tmp_path):
    from xtalgen.cli import main

    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    Structure.from_str(pd.read_csv(perov_val, nrows=1)["cif"][0], fmt="cif").to(filename=str(cif_dir / "a.cif"))
    out = tmp_path / "eval"
    assert main(["evaluate", str(cif_dir), "--out", str(out), "--hull", str(tmp_path / "nope.json.gz")]) == 2
    assert not out.exists()


# --- periodic sampling during training -------------------------------------------------------------------
def test_periodic_pass_logs_physical_rate_and_estimates_stability_with_a_hull(hull_file, tmp_path):
    from xtalgen.sampling.periodic import PREFIX, _evaluate, _Stability
    from xtalgen.schema import load_config

    cfg = load_config(overrides=[f"evaluate.cache_dir={tmp_path / 'cache'}"])
    structures = [rock_salt(5.64), rock_salt(5.70), blown_up(rock_salt(5.64), 4.9e8), rock_salt(5.64)]
    rows = [{"id": f"sample-{i}", "conditions": {}, "formula": s.composition.reduced_formula,
             "num_atoms": len(s)} for i, s in enumerate(structures)]
    reference = [rock_salt(5.5, ("K", "Cl"))]  # NaCl is novel against it
    # Without a hull: the physical-cell rate, and no stability.
    plain = _evaluate(structures, rows, reference, relax=False, stability=_Stability(cfg, None))
    assert plain[PREFIX + "physical_cell_rate"] == 0.75
    assert PREFIX + "stable_rate" not in plain
    # With a hull: the first 3 samples are relaxed (cheaply) and scored.
    stability = _Stability(cfg, hull_file, relax_count=3, relax_steps=5)
    potential = StandInPotential({"NaCl": -3.25}, {"NaCl": 0.0}, fail_at=5.70)
    stability._potential = potential
    metrics = _evaluate(structures, rows, reference, relax=False, stability=stability)
    assert potential.relaxed == ["NaCl", "NaCl"]  # sample 1 fails, sample 2 is not physical
    assert metrics[PREFIX + "physical_cell_rate"] == 0.75
    assert metrics[PREFIX + "stability_sample_count"] == 3.0
    assert metrics[PREFIX + "stable_rate"] == pytest.approx(1 / 3)
    assert metrics[PREFIX + "sun_rate"] == pytest.approx(1 / 3)  # sample 0: stable, unique, novel
    assert metrics[PREFIX + "relax_failures"] == 2.0
    table = metrics[PREFIX + "structures"]
    assert [r.get("stable") for r in table] == [True, False, False, None]
    assert table[0]["sun"] is True and table[3].get("sun") is None


def test_periodic_pass_of_a_model_logs_the_physical_cell_rate(monkeypatch):
    import torch

    from xtalgen.models.diffusion import build_model
    from xtalgen.sampling.periodic import HULL_ENV, PREFIX, make_periodic_sampler
    from xtalgen.schema import load_config

    monkeypatch.delenv(HULL_ENV, raising=False)
    cfg = load_config(overrides=["model.score_net.preset=debug", "train.sample_count=3", "train.sample_steps=2",
                                 "sample.corrector_steps=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, {"mean_density": 0.05, "num_atoms_histogram": {4: 1}})
    metrics = make_periodic_sampler(cfg)(model, 7)
    table = metrics[PREFIX + "structures"]
    assert metrics[PREFIX + "physical_cell_rate"] == sum(bool(r.get("physical_cell")) for r in table) / 3
    assert all("volume_per_atom" in r for r in table)


def test_energy_plot_leaves_out_structures_whose_stability_was_not_assessed():
    from xtalgen.evaluation.plots import e_above_hull_figure

    rows = [{"e_above_hull": 0.02}, {"e_above_hull": 0.5},
            {"e_above_hull": -1.5, "stability_not_assessed": "no compound of its chemical system in the hull"}]
    ax = e_above_hull_figure(rows, threshold=0.1).axes[0]
    assert ax.get_title() == "Energy above hull (n = 2 of 3 structures with an energy above hull)"
    assert ax.get_legend().get_texts()[0].get_text() == "stable < 0.1 eV/atom: 1"
