"""Evaluation with real CHGNet relaxations (kept small: few structures, capped optimizer steps).

The default test relaxes one Perov-5 structure twice (as generated and as reference); the slow ones
build the elemental references from prototypes, use a process pool, and kill -9 a running
`xtalgen evaluate` to check that the rerun neither loses nor repeats work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from xtalgen.evaluation import evaluate_structures
from xtalgen.schema import EvaluateConfig


def _perov(csv_path, rows: list[int]) -> list[Structure]:
    frame = pd.read_csv(csv_path, nrows=max(rows) + 1)
    return [Structure.from_str(frame["cif"][i], fmt="cif") for i in rows]


@pytest.fixture(scope="module")
def mp_elemental(shared_data) -> str:
    return str(shared_data / "mp_reference" / "mp_elemental_reference_entries.json.gz")


def test_relaxed_structure_against_itself_is_on_hull_and_not_novel(perov_val, mp_elemental, tmp_path):
    structures = _perov(perov_val, [1])  # VIrO3: negative formation energy with CHGNet
    cfg = EvaluateConfig(cache_dir=str(tmp_path), elemental_reference=mp_elemental, relax_steps=20)
    rows, summary = evaluate_structures(structures, reference=structures, relax=True, cfg=cfg)
    row = rows[0]
    assert row["relaxed"] and row["valid"]
    assert row["energy_per_atom"] <= row["initial_energy_per_atom"]  # relaxing lowers the energy
    assert 0 < row["relax_steps"] <= 20 and row["relax_converged"] == (row["relax_steps"] < 20)
    assert 0.0 <= row["rmsd"] < 1.0
    # The reference went through the same deterministic relaxation: identical energy, so this
    # structure is the only compound of its system and sits exactly on the hull.
    assert row["formation_energy_per_atom"] < 0
    assert row["e_above_hull"] == pytest.approx(0.0, abs=1e-5)
    assert row["stable"] and row["on_or_below_hull"] and not row["novel"] and not row["sun"]
    assert summary["novel_rate"] == 0.0 and summary["stable_rate"] == 1.0


@pytest.mark.slow
def test_builtin_elemental_references_give_nacl_formation_energy(tmp_path):
    """Na and Cl references from relaxed prototypes (Cl: the Cl2 molecule); rock-salt NaCl then has
    a formation energy near the experimental -2.1 eV/atom."""
    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    nacl = nacl.get_primitive_structure()
    cfg = EvaluateConfig(cache_dir=str(tmp_path), relax_steps=150)
    rows, _ = evaluate_structures([nacl], relax=True, cfg=cfg, allow_elements_only_hull=True)
    assert -2.6 < rows[0]["formation_energy_per_atom"] < -1.6
    assert rows[0]["e_above_hull"] < 0  # below the elemental-only hull
    cache = json.loads((tmp_path / "elemental" / "chgnet.json").read_text())
    assert set(cache) == {"Na", "Cl"} and cache["Cl"]["prototype"] == "dimer"


@pytest.mark.slow
def test_process_pool_matches_serial(perov_val, mp_elemental, tmp_path):
    structures = _perov(perov_val, [1, 3, 5])
    base = dict(cache_dir=str(tmp_path), elemental_reference=mp_elemental, relax_steps=10)
    serial, _ = evaluate_structures(structures, relax=True, cfg=EvaluateConfig(**base, workers=1))
    pooled, _ = evaluate_structures(structures, relax=True, cfg=EvaluateConfig(**base, workers=2))
    for a, b in zip(serial, pooled):
        assert a["energy_per_atom"] == pytest.approx(b["energy_per_atom"], abs=1e-5)
        assert a["relax_steps"] == b["relax_steps"]


@pytest.mark.slow
def test_killed_evaluation_resumes_without_loss_or_duplicates(perov_val, mp_elemental, tmp_path):
    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    for i, structure in enumerate(_perov(perov_val, [1, 2, 3, 5])):
        structure.to(filename=str(cif_dir / f"s{i}.cif"))
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "xtalgen.cli", "evaluate", str(cif_dir), "--out", str(out),
               "--no-plots", "--no-progress", "relax_steps=15", "relax_batch=1", f"cache_dir={tmp_path / 'cache'}",
               f"elemental_reference={mp_elemental}"]
    log = out / "per_structure.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        assert process.poll() is None, "xtalgen evaluate exited before the kill"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = log.read_text().splitlines()
    assert 1 <= len(before) < 4, "the kill should land mid-run"
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = log.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in after]
    assert sorted(ids) == ["s0", "s1", "s2", "s3"]  # complete, no duplicates
    assert after[: len(before)] == before  # finished work was kept, not redone
    assert len(pd.read_csv(out / "per_structure.csv")) == 4


def test_batched_relaxation_follows_the_serial_trajectories(perov_val):
    from xtalgen.evaluation.relax import load_potential, relax_many

    structures = _perov(perov_val, [1, 2, 4])
    potential = load_potential("chgnet")
    pairs = list(enumerate(structures))
    serial = {i: r for i, r, _ in relax_many(pairs, potential, steps=8, batch=1)}
    batched = {i: r for i, r, _ in relax_many(pairs, potential, steps=8, batch=3)}
    assert sorted(batched) == [0, 1, 2]
    for i in range(3):
        assert batched[i].steps == serial[i].steps
        assert batched[i].energy_per_atom == pytest.approx(serial[i].energy_per_atom, abs=1e-5)
        assert batched[i].structure.lattice.abc == pytest.approx(serial[i].structure.lattice.abc, abs=1e-4)


def test_one_pass_batch_prediction_is_chgnets_bit_for_bit(perov_val):
    """batched_relax's predict_efsm (one backward pass for forces and stress) returns exactly what
    CHGNet's predict_graph does, for a batch and for a single graph."""
    import numpy as np

    from xtalgen.evaluation.batched_relax import predict_efsm
    from xtalgen.evaluation.relax import load_potential

    structures = _perov(perov_val, [1, 2, 4])
    structures[1].perturb(0.1, min_distance=0.05)  # off its minimum: sizeable forces and stress
    model = load_potential("chgnet").model
    for batch in (structures, structures[:1]):
        expected = model.predict_graph([model.graph_converter(s) for s in batch], task="efsm", batch_size=len(batch))
        expected = [expected] if isinstance(expected, dict) else expected
        got = predict_efsm(model, [model.graph_converter(s) for s in batch])
        assert len(got) == len(expected)
        for mine, chgnets in zip(got, expected):
            assert set(mine) == set("efsm")
            for key in "efsm":
                assert mine[key].dtype == chgnets[key].dtype and np.array_equal(mine[key], chgnets[key]), key


def test_batched_calculator_state_check_agrees_with_ase():
    """The quick unchanged-atoms path of _BatchedCalculator.check_state gives ASE's answers."""
    from ase.build import bulk
    from ase.calculators.calculator import Calculator

    from xtalgen.evaluation.batched_relax import _BatchedCalculator

    atoms = bulk("NaCl", "rocksalt", a=5.6)
    calc = _BatchedCalculator(None, 1.0, 1.0)
    assert calc.check_state(atoms) == Calculator.check_state(calc, atoms)  # nothing computed yet
    calc.atoms = atoms.copy()
    variants = [atoms.copy() for _ in range(5)]
    variants[1].positions[0, 0] += 1e-12
    variants[2].set_cell(atoms.cell * 1.001, scale_atoms=False)
    variants[3].set_initial_magnetic_moments([1.0, 0.0])
    variants[4].positions[1, 2] = float("nan")
    for other in variants:
        assert calc.check_state(other) == Calculator.check_state(calc, other)
    assert calc.check_state(variants[0]) == []


def test_bulk_modulus_proxy_of_rock_salt():
    """Birch-Murnaghan fit of CHGNet energies for NaCl: experiment gives ~25 GPa."""
    from xtalgen.evaluation.properties import bulk_modulus
    from xtalgen.evaluation.relax import load_potential

    nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    modulus = bulk_modulus(nacl.get_primitive_structure(), load_potential("chgnet"))
    assert 15.0 < modulus < 40.0


def test_process_pool_gets_the_potential_by_name_even_after_this_process_loaded_it():
    """The hull stage loads the model for elemental references before relaxing the reference set
    over a pool; the pool must still get the registry name (a loaded model cannot be shipped)."""
    from xtalgen.evaluation.pipeline import _Potentials
    from xtalgen.evaluation.relax import Potential
    from xtalgen.schema import EvaluateConfig

    models = _Potentials(EvaluateConfig(workers=2), None)
    assert models.relax_target == "chgnet"
    loaded = models.model  # loads CHGNet in this process
    assert isinstance(loaded, Potential)
    assert models.relax_target == "chgnet"  # still the name, not the loaded model
    # one process relaxes in place with the model it loaded once (never a second copy, never a name)
    serial = _Potentials(EvaluateConfig(workers=1), None)
    target = serial.relax_target
    assert isinstance(target, Potential) and target is serial.model
    # a potential handed in has no registry name to give a pool: the object itself is used
    given = _Potentials(EvaluateConfig(workers=2), loaded)
    assert given.relax_target is loaded


def test_real_compounds_without_a_hull_are_not_reported_stable(shared_data, mp_elemental, tmp_path, capsys):
    """DFT-relaxed perovskites, relaxed with CHGNet, no reference and no hull: an elements-only hull
    would call them all stable (negative formation energies); the evaluator says it cannot judge."""
    from xtalgen.cli import main

    frame = pd.read_csv(shared_data / "perov_5" / "test.csv", nrows=3, index_col=0)
    frame.to_csv(tmp_path / "real.csv")
    out = tmp_path / "eval"
    argv = ["evaluate", str(tmp_path / "real.csv"), "--out", str(out), "--no-progress", "--no-plots",
            "relax_steps=3", f"cache_dir={tmp_path / 'cache'}", f"elemental_reference={mp_elemental}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "stable, SUN: not assessed (no hull of real compounds" in printed
    assert "stable 100" not in printed
    assert "physical cell 100.0%" in printed and "RMSD generated -> relaxed" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stable_rate"] is None and summary["sun_rate"] is None
    assert summary["stability_not_assessed_reason"].startswith("no hull of real compounds")
    assert summary["relaxed_count"] == 3 and summary["relax_failures"] == 0
    assert 0 <= summary["rmsd_median"] <= summary["rmsd_p90"] <= summary["rmsd_max"]


@pytest.mark.parametrize("batch", [1, 2])
def test_runaway_guard_stops_serial_and_batched_relaxations(perov_val, monkeypatch, batch):
    """With the allowed volume change made tiny, any cell relaxation is a runaway: proves the guard
    is in the path of both the serial (StructOptimizer) and the batched relaxation."""
    from xtalgen.evaluation import physical
    from xtalgen.evaluation.relax import load_potential, relax_many

    monkeypatch.setattr(physical, "RUNAWAY_VOLUME_FACTOR", 1.0 + 1e-9)
    squeezed = _perov(perov_val, [1, 2])
    for s in squeezed:
        s.scale_lattice(s.volume * 0.85)  # the relaxation must expand these cells
    results = list(relax_many(list(enumerate(squeezed)), load_potential("chgnet"), steps=5, batch=batch))
    assert len(results) == 2
    for _, result, error in results:
        assert result is None and "relaxation ran away" in error
