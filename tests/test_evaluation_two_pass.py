"""Two-pass relaxation (opt-in): every structure to the loose screening fmax, then only those near
the hull on to `relax_fmax` (evaluation/pipeline.py, `evaluate.relax_screen_fmax`, `evaluate.refine_window`).

Fast tests use a stand-in potential whose energy and step count depend on fmax, against the small
hull file of test_evaluation_honesty.py (NaCl at -3.3 eV/atom), so every number is known in advance.
The CHGNet test relaxes two 5-atom Perov-5 cells with a capped step count.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure
from test_evaluation_honesty import _entry, hull_entries, rock_salt

from xtalgen.evaluation import evaluate_structures
from xtalgen.evaluation.pipeline import RELAXED_KEY, _json_default, refine_ceiling
from xtalgen.evaluation.relax import MP2020_FOOTING, Potential, RelaxResult
from xtalgen.evaluation.relax_result import displacement_rmsd
from xtalgen.schema import ConfigError, EvaluateConfig, load_config

SCREEN, TIGHT = 0.1, 0.05  # eV/Å: the screening fmax used here, and relax_fmax's default
WINDOW = 0.05  # eV/atom: the window these tests use (the default, 0.2, is chosen on Perov-5)
NEW_KEYS = {"refined", "relax_fmax_reached", "screen_energy_per_atom", "screen_e_above_hull", "screen_relax_steps"}


class FmaxStandIn(Potential):
    """Rock-salt NaCl cells told apart by lattice constant. A relaxation to fmax f ends at
    base[a] + 0.2 f eV/atom (0.02 above base at 0.1, 0.01 at 0.05) after 100 f steps, and moves the
    first atom by 0.01 (fractional) along x, so RMSDs add up over passes. `unconverged`: cells whose
    relaxation hits the step cap; `fail_tight`: cells whose tight pass raises."""

    name = "fmax-stand-in"
    energy_footing = MP2020_FOOTING

    def __init__(self, base: dict[float, float], unconverged=(), fail_tight=()):
        self.base, self.unconverged, self.fail_tight = base, set(unconverged), set(fail_tight)
        self.calls: list[tuple[float, float]] = []  # (a, fmax) per relaxation

    def energies_per_atom(self, structures):
        return [self.base[round(s.lattice.a, 3)] + 0.1 for s in structures]

    def relax(self, structure, fmax=0.05, steps=500, relax_cell=True):
        a = round(structure.lattice.a, 3)
        self.calls.append((a, fmax))
        if a in self.fail_tight and fmax == TIGHT:
            raise RuntimeError("the potential gave NaN forces")
        relaxed = structure.copy()
        relaxed.translate_sites([0], [0.01, 0.0, 0.0], frac_coords=True)
        converged = a not in self.unconverged
        return RelaxResult(structure=relaxed, energy_per_atom=self.base[a] + 0.2 * fmax,
                           initial_energy_per_atom=self.base[a] + 0.1, converged=converged,
                           steps=round(100 * fmax) if converged else steps, rmsd=displacement_rmsd(structure, relaxed))


@pytest.fixture
def hull_path(tmp_path):
    path = tmp_path / "hull.json"
    path.write_text(json.dumps(hull_entries()))
    return path


# Screening e_above_hull (hull: NaCl at -3.3 eV/atom) = base + 0.02 + 3.3. With the default threshold
# 0.1 and a window of 0.05, structures below 0.15 are refined.
BASES = {
    5.64: -3.25,   # screen 0.07: refined, ends at 0.06 (stable)
    5.62: -3.19,   # screen 0.13: inside the window above the threshold: refined, ends at 0.12
    5.60: -3.16,   # screen 0.16: outside: keeps the screening result
    5.66: -3.30,   # screen 0.02 but the screen hit the step cap: not refined (a single pass stops there too)
    5.70: -3.28,   # screen 0.04: its tight pass fails: a relaxation failure, never stable
}


@functools.cache
def _rock_salt_sites() -> tuple[list, np.ndarray]:
    cell = rock_salt(5.64)  # pymatgen's space-group expansion takes ~1 s: once
    return cell.species, cell.frac_coords


def _nacl(a: float) -> Structure:
    species, frac_coords = _rock_salt_sites()
    return Structure(Lattice.cubic(a), species, frac_coords)


def _run(tmp_path, hull_path, potential=None, log_path=None, conditions=None, **cfg):
    potential = potential or FmaxStandIn(BASES, unconverged=[5.66], fail_tight=[5.70])
    structures = [_nacl(a) for a in BASES]
    metadata = [{"conditions": conditions}] * len(structures) if conditions else None
    cfg = {"relax_screen_fmax": SCREEN, "refine_window": WINDOW, **cfg}
    config = EvaluateConfig(cache_dir=str(tmp_path / "cache"), relax_steps=50, **cfg)
    rows, summary = evaluate_structures(structures, relax=True, cfg=config, potential=potential, hull=hull_path,
                                        log_path=log_path, metadata=metadata, ids=[str(a) for a in BASES])
    return structures, {r["id"]: r for r in rows}, summary, potential


def test_only_structures_near_the_hull_are_refined(tmp_path, hull_path):
    structures, rows, summary, potential = _run(tmp_path, hull_path)
    # Every relaxable structure is screened; only those below 0.1 + 0.05 eV/atom go on.
    assert sorted(potential.calls) == sorted([(a, SCREEN) for a in BASES] + [(5.64, TIGHT), (5.62, TIGHT), (5.70, TIGHT)])
    near, edge, far, capped, failed = (rows[str(a)] for a in BASES)
    for row, base in ((near, -3.25), (edge, -3.19)):
        assert row["refined"] is True and row["relax_fmax_reached"] == TIGHT and row["relaxed"]
        assert row["energy_per_atom"] == pytest.approx(base + 0.2 * TIGHT)
        assert row["screen_energy_per_atom"] == pytest.approx(base + 0.2 * SCREEN)
        assert row["screen_e_above_hull"] == pytest.approx(base + 0.02 + 3.3)
        assert row["e_above_hull"] == pytest.approx(base + 0.01 + 3.3)
        assert row["relax_steps"] == 10 + 5 and row["screen_relax_steps"] == 10  # both passes counted
        assert row["initial_energy_per_atom"] == pytest.approx(base + 0.1)  # of the input, not the screened cell
    # RMSD from the input: two passes moved the first atom by 0.02 of a (0.01 each; drift removed).
    a = 5.64
    assert near["rmsd"] == pytest.approx(displacement_rmsd(structures[0], Structure.from_dict(near[RELAXED_KEY])))
    assert near["rmsd"] == pytest.approx(2 * 0.01 * a * math.sqrt(7) / 8, rel=1e-6)
    assert near["stable"] is True and edge["stable"] is False
    assert far["refined"] is False and far["relax_fmax_reached"] == SCREEN
    assert far["e_above_hull"] == pytest.approx(0.16) and far["relax_steps"] == 10 and "screen_e_above_hull" not in far
    assert capped["refined"] is False and capped["relax_fmax_reached"] is None and capped["relax_converged"] is False
    assert capped["stable"] is True  # judged on its (capped) screen, as a capped single pass is
    # A tight pass that fails: a relaxation failure as in one pass, never stable.
    assert failed["refined"] is False and failed["relax_failure"] == "RuntimeError"
    assert "NaN forces" in failed["relax_error"] and not failed.get("relaxed")
    assert "energy_per_atom" not in failed and RELAXED_KEY not in failed and failed["stable"] is False
    assert failed["screen_e_above_hull"] == pytest.approx(0.04)
    assert summary["relax_mode"] == "two-pass" and summary["refined_count"] == 2
    assert summary["refine_below_e_above_hull"] == pytest.approx(0.15)
    assert summary["relaxed_count"] == 4 and summary["relax_failure_reasons"] == {"RuntimeError": 1}
    assert summary["stable_rate"] == pytest.approx(2 / 5)


def test_window_is_above_the_largest_threshold(tmp_path, hull_path):
    assert refine_ceiling([{}], EvaluateConfig()) == 0.1
    assert refine_ceiling([{"conditions": {"energy_above_hull": "<=0.3"}}], EvaluateConfig()) == pytest.approx(0.3)
    assert refine_ceiling([{"conditions": {"energy_above_hull": "0..0.25"}}], EvaluateConfig()) == pytest.approx(0.25)
    assert refine_ceiling([{}], EvaluateConfig(stability_threshold=0.2)) == pytest.approx(0.2)
    # An energy_above_hull target of 0.3 puts the screen-0.16 structure inside the window.
    _, rows, summary, _ = _run(tmp_path, hull_path, conditions={"energy_above_hull": "<=0.3"})
    assert rows["5.6"]["refined"] is True and summary["refine_below_e_above_hull"] == pytest.approx(0.35)
    _, rows, summary, _ = _run(tmp_path, hull_path, refine_window=0.0)  # only below the threshold itself
    assert [rows[str(a)]["refined"] for a in (5.64, 5.62, 5.6)] == [True, False, False]


@pytest.mark.parametrize("screen", [None, 0.0, TIGHT])
def test_disabling_two_pass_gives_the_one_pass_rows(tmp_path, hull_path, screen):
    _, one_pass, summary, potential = _run(tmp_path, hull_path, relax_screen_fmax=screen)
    assert sorted(potential.calls) == sorted((a, TIGHT) for a in BASES)  # one pass, to relax_fmax
    for row in one_pass.values():
        assert not NEW_KEYS & set(row)
    assert "relax_mode" not in summary and "refined_count" not in summary
    assert one_pass["5.6"]["e_above_hull"] == pytest.approx(0.15)  # tight, as before
    _, reference_rows, _, _ = _run(tmp_path, hull_path, relax_screen_fmax=None)
    assert one_pass == reference_rows


def test_without_a_hull_every_structure_gets_one_pass(tmp_path):
    """Without a hull stability is not judged, so nothing tells which structures are near it."""
    potential = FmaxStandIn(BASES)
    rows, summary = evaluate_structures([_nacl(5.64)], relax=True, potential=potential,
                                        cfg=EvaluateConfig(cache_dir=str(tmp_path), relax_screen_fmax=SCREEN))
    assert potential.calls == [(5.64, TIGHT)] and "refined" not in rows[0]
    assert summary["stability_assessed"] is False


def test_two_pass_resume_neither_loses_nor_duplicates(tmp_path, hull_path):
    log = tmp_path / "per_structure.jsonl"
    _, full, full_summary, _ = _run(tmp_path, hull_path, log_path=tmp_path / "full.jsonl")
    _run(tmp_path, hull_path, log_path=log)
    lines = log.read_text().splitlines()
    # 5 screening lines, then the refinements (5.64, 5.62 and the failed 5.70) supersede theirs.
    assert len(lines) == 8 and sorted(json.loads(line)["id"] for line in lines[5:]) == ["5.62", "5.64", "5.7"]
    # A rerun finds everything done: nothing relaxed again, nothing appended.
    _, again, _, potential = _run(tmp_path, hull_path, log_path=log)
    assert potential.calls == [] and log.read_text().splitlines() == lines and _same(again, full)
    # Killed during the refinement: one refinement written, the next cut mid-line.
    log.write_text("\n".join(lines[:6]) + "\n" + lines[6][: len(lines[6]) // 2])
    _, resumed, summary, potential = _run(tmp_path, hull_path, log_path=log)
    done_first = json.loads(lines[5])["id"]
    assert sorted(potential.calls) == sorted((float(i), TIGHT) for i in ("5.64", "5.62", "5.7") if i != done_first)
    ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert len(ids) == 8 and sorted(set(ids)) == sorted(full)
    assert _same(resumed, full) and summary == full_summary


def _same(a: dict, b: dict) -> bool:
    """Equal once written as JSON (the log holds the relaxed structures' tuples as lists)."""
    return json.dumps(a, sort_keys=True, default=_json_default) == json.dumps(b, sort_keys=True, default=_json_default)


def test_cli_reports_the_two_passes_and_refuses_to_mix_modes_on_resume(tmp_path, hull_path, monkeypatch, capsys):
    from xtalgen.cli import main
    from xtalgen.evaluation import relax

    monkeypatch.setitem(relax.POTENTIALS, "fmax-stand-in",
                        lambda **_: FmaxStandIn(BASES, unconverged=[5.66], fail_tight=[5.70]))
    source = tmp_path / "cifs"
    source.mkdir()
    for a in BASES:
        _nacl(a).to(filename=str(source / f"a{a}.cif"))
    out = tmp_path / "eval"
    args = ["evaluate", str(source), "--out", str(out), "--hull", str(hull_path), "--no-plots", "--no-progress",
            "--potential", "fmax-stand-in", f"cache_dir={tmp_path / 'cache'}", "relax_steps=50"]
    assert main([*args, "relax_screen_fmax=0.1", "refine_window=0.05"]) == 0
    printed = capsys.readouterr().out
    assert "two-pass relaxation: all to fmax 0.1 eV/Å, then 2 with e_above_hull < 0.15 eV/atom to fmax 0.05" in printed
    table = pd.read_csv(out / "per_structure.csv", index_col="id")
    assert list(table.columns[list(table.columns).index("relax_steps") + 1:][:2]) == ["refined", "relax_fmax_reached"]
    assert table.loc["a5.64", "refined"] and table.loc["a5.64", "relax_fmax_reached"] == TIGHT
    assert not table.loc["a5.6", "refined"] and table.loc["a5.6", "relax_fmax_reached"] == SCREEN
    summary = json.loads((out / "summary.json").read_text())
    assert summary["relax_mode"] == "two-pass" and summary["refined_count"] == 2
    assert json.loads((out / "settings.json").read_text())["relax_screen_fmax"] == SCREEN
    # The log holds screened rows: a one-pass rerun into the same --out would mix the two.
    capsys.readouterr()
    assert main(args) == 2
    assert "'relax_screen_fmax': 0.1" in capsys.readouterr().err
    lines = (out / "per_structure.jsonl").read_text().splitlines()
    assert main([*args, "relax_screen_fmax=0.1", "refine_window=0.05"]) == 0  # the same settings resume
    assert (out / "per_structure.jsonl").read_text().splitlines() == lines


def test_config_keys_are_checked_at_load():
    cfg = load_config(overrides=["evaluate.relax_screen_fmax=null", "evaluate.refine_window=0.2"]).evaluate
    assert cfg.relax_screen_fmax is None and cfg.refine_window == 0.2
    assert load_config().evaluate.relax_screen_fmax is None  # opt-in: one pass by default
    assert load_config(overrides=["evaluate.relax_screen_fmax=0.1"]).evaluate.relax_screen_fmax == SCREEN
    with pytest.raises(ConfigError, match="evaluate.refine_window"):
        load_config(overrides=["evaluate.refine_window=-0.1"])
    with pytest.raises(ConfigError, match="evaluate.relax_screen_fmax"):
        load_config(overrides=["evaluate.relax_screen_fmax=-1"])
    with pytest.raises(ConfigError, match="refine_windw"):
        load_config(overrides=["evaluate.refine_windw=0.1"])


# --- CHGNet --------------------------------------------------------------------------------------------------
def test_chgnet_refinement_is_a_tight_relaxation_from_the_screened_structure(perov_val, shared_data, tmp_path):
    """VIrO3 below a hull compound (refined) and LaSnOFN ~1 eV/atom above one (not refined)."""
    from xtalgen.evaluation.hull import load_elemental_entries
    from xtalgen.evaluation.relax import load_potential, relax_many

    frame = pd.read_csv(perov_val, nrows=8)
    near, far = (Structure.from_str(frame["cif"][i], fmt="cif") for i in (1, 7))
    assert (near.composition.reduced_formula, far.composition.reduced_formula) == ("VIrO3", "LaSnNOF")
    elemental = load_elemental_entries(shared_data / "mp_reference" / "mp_elemental_reference_entries.json.gz")
    entries = [_entry(symbol, elemental[symbol]) for symbol in ("V", "Ir", "O", "La", "Sn", "N", "F")]
    # CHGNet puts VIrO3 near -7.8 and LaSnOFN near -6.6 eV/atom (screened).
    entries += [_entry("VIrO3", -7.5 * 5), _entry("LaSnNOF", -7.6 * 5)]
    hull = tmp_path / "hull.json"
    hull.write_text(json.dumps(entries))
    potential = load_potential("chgnet")
    cfg = EvaluateConfig(cache_dir=str(tmp_path / "cache"), relax_steps=60, relax_screen_fmax=SCREEN)
    log = tmp_path / "log.jsonl"
    rows, summary = evaluate_structures([near, far], relax=True, cfg=cfg, potential=potential, hull=hull, log_path=log,
                                        ids=["near", "far"])
    refined, kept = rows
    assert refined["refined"] is True and refined["relax_fmax_reached"] == TIGHT and refined["stable"] is True
    assert kept["refined"] is False and kept["relax_fmax_reached"] == SCREEN and kept["e_above_hull"] > 0.5
    assert kept["stable"] is False
    screened = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["id"] for r in screened] in (["near", "far", "near"], ["far", "near", "near"])
    screen_row = next(r for r in screened if r["id"] == "near")
    assert screen_row["refined"] is False and screen_row["relax_fmax_reached"] == SCREEN
    # The refinement is one tight relaxation started from the screened structure.
    (_, tight, error), = relax_many([(0, Structure.from_dict(screen_row[RELAXED_KEY]))], potential, fmax=TIGHT,
                                    steps=60, batch=cfg.relax_batch)
    assert not error
    assert refined["energy_per_atom"] == pytest.approx(tight.energy_per_atom, abs=1e-5)
    assert refined["relax_steps"] == screen_row["relax_steps"] + tight.steps
    assert refined["energy_per_atom"] <= screen_row["energy_per_atom"] + 1e-6
    assert refined["screen_energy_per_atom"] == screen_row["energy_per_atom"]
    final = Structure.from_dict(refined[RELAXED_KEY])
    assert np.allclose(final.lattice.matrix, tight.structure.lattice.matrix, atol=1e-4)
    assert refined["rmsd"] == pytest.approx(displacement_rmsd(near, final))  # from the input structure
    assert summary["refined_count"] == 1
