"""Evaluation: validity, uniqueness, novelty, hull arithmetic, resume, inputs, targets, CDVAE metrics.

Fast tests only: no relaxation here (see test_evaluation_relax.py). Real structures from Perov-5 and
Carbon-24 (../shared/data), known answers computed independently of the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Composition, Lattice, Structure

from xtalgen.evaluation import evaluate_structures
from xtalgen.evaluation.cdvae_metrics import (
    CompositionScaler,
    CrystalNNFingerprint,
    cdvae_metrics,
    composition_fingerprint,
)
from xtalgen.evaluation.hull import ConvexHullReference, load_elemental_entries
from xtalgen.evaluation.inputs import iter_structures
from xtalgen.evaluation.matching import MatchSettings, duplicate_of
from xtalgen.evaluation.properties import meets_target
from xtalgen.evaluation.validity import compositional_validity, structural_validity


def _structures(csv_path, n: int, skip: int = 0) -> list[Structure]:
    frame = pd.read_csv(csv_path, skiprows=range(1, skip + 1), nrows=n)
    return [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]


@pytest.fixture(scope="module")
def perov(perov_val) -> list[Structure]:
    return _structures(perov_val, 12)


# --- validity -----------------------------------------------------------------------------------------
def test_real_structures_are_valid(perov):
    for structure in perov:
        assert structural_validity(structure).valid
        assert compositional_validity(structure) == "valid"


def test_overlapping_atoms_and_tiny_cells_are_invalid():
    close = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.1, 0, 0]])  # 0.4 Å apart
    check = structural_validity(close)
    assert not check.valid and check.min_distance == pytest.approx(0.4)
    # Atoms 0.3 Å apart only through the periodic boundary (0.025 and 0.975 along a).
    across = Structure(Lattice.cubic(6.0), ["Na", "Cl"], [[0.025, 0, 0], [0.975, 0, 0]])
    assert structural_validity(across).min_distance == pytest.approx(0.3)
    assert not structural_validity(across).valid
    # A single atom whose own image is 0.45 Å away (a short lattice vector) is invalid too.
    squashed = Structure(Lattice.orthorhombic(0.45, 5, 5), ["Fe"], [[0, 0, 0]])
    assert not structural_validity(squashed).valid
    tiny = Structure(Lattice.cubic(0.4), ["Fe"], [[0, 0, 0]])  # 0.064 Å³
    assert not structural_validity(tiny).valid


def test_compositional_validity_known_answers():
    assert compositional_validity({"Na": 1, "Cl": 1}) == "valid"
    assert compositional_validity({"Na": 1, "Cl": 2}) == "invalid"  # no neutral oxidation states
    assert compositional_validity({"Ca": 1, "Ti": 1, "O": 3}) == "valid"
    assert compositional_validity({"Fe": 3, "Ni": 1}) == "valid"  # all-metal alloy
    assert compositional_validity({"C": 8}) == "valid"  # one element


def test_element_smact_lacks_gives_unknown_not_a_crash():
    # SMACT has no oxidation states for fermium (Z=100) nor any entry for oganesson (Z=118).
    assert compositional_validity({"Fm": 2, "O": 3}) == "unknown"
    assert compositional_validity({"Og": 1, "F": 2}) == "unknown"
    fm2o3 = Structure(Lattice.cubic(5.0), ["Fm", "Fm", "O", "O", "O"],
                      [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    rows, summary = evaluate_structures([fm2o3])
    assert rows[0]["comp_valid"] == "unknown" and rows[0]["valid"] is False
    assert summary["comp_unknown_rate"] == 1.0


# --- uniqueness and novelty ----------------------------------------------------------------------------
def test_three_copies_and_two_distinct_are_three_fifths_unique(perov):
    a, b, c = perov[:3]
    moved = a.copy()
    moved.translate_sites(list(range(len(moved))), [0.31, 0.12, 0.5])  # same crystal, shifted origin
    supercell = a.copy()
    supercell.make_supercell([2, 1, 1])  # same crystal, twice the cell
    rows, summary = evaluate_structures([a, b, moved, c, supercell])
    assert summary["unique_rate"] == pytest.approx(3 / 5)
    assert [r["unique"] for r in rows] == [True, True, False, True, False]
    assert rows[2]["duplicate_of"] == rows[4]["duplicate_of"] == "0"


def test_different_crystals_of_same_formula_are_not_merged(carbon_val):
    carbons = _structures(carbon_val, 6)  # all pure carbon: one formula group, different polymorphs
    first = duplicate_of(carbons, MatchSettings())
    assert first == list(range(6))


def test_novelty_against_reference(perov):
    generated, reference = perov[:6], perov[3:12]  # 3 seen in training, 3 not
    rows, summary = evaluate_structures(generated, reference=reference)
    assert [r["novel"] for r in rows] == [True, True, True, False, False, False]
    assert summary["novel_rate"] == 0.5 and summary["reference_size"] == 9
    _, itself = evaluate_structures(reference, reference=reference)
    assert itself["novel_rate"] == 0.0


def test_without_reference_novelty_is_reported_missing(perov):
    rows, summary = evaluate_structures(perov[:2])
    assert summary["novel_rate"] is None
    assert any("novelty not computed" in note for note in summary["notes"])
    assert "novel" not in rows[0]



def test_matching_off_reports_uniqueness_and_novelty_as_not_assessed(perov):
    from xtalgen.schema import EvaluateConfig

    structures = [perov[0], perov[0], perov[1]]
    _, matched = evaluate_structures(structures, reference=perov[:1])
    assert matched["unique_rate"] == 2 / 3 and matched["novel_rate"] == 1 / 3
    rows, summary = evaluate_structures(structures, reference=perov[:1], cfg=EvaluateConfig(matching=False))
    assert summary["unique_rate"] is None and summary["novel_rate"] is None
    assert all("unique" not in row and "novel" not in row for row in rows)
    assert any("structure matching is off" in note for note in summary["notes"])
    assert summary["valid_rate"] == matched["valid_rate"]  # the per-structure checks are unchanged

# --- hull -------------------------------------------------------------------------------------------------
def test_hull_known_answers():
    # A and B at 0 eV/atom, AB at -1 eV/atom: the hull is the two lines through (0,0), (1/2,-1), (1,0).
    hull = ConvexHullReference(
        [Composition("Li"), Composition("Na"), Composition("LiNa")], [0.0, 0.0, -1.0]
    )
    assert hull.e_above_hull(Composition("LiNa"), -1.0) == pytest.approx(0.0, abs=1e-9)
    assert hull.e_above_hull(Composition("LiNa"), -1.2) == pytest.approx(-0.2)  # below the hull
    # LiNa3 (x_Na = 3/4): hull energy is -0.5 eV/atom, so -0.3 eV/atom sits 0.2 above it.
    assert hull.e_above_hull(Composition("LiNa3"), -0.3) == pytest.approx(0.2)
    assert hull.formation_energy_per_atom(Composition("LiNa3"), -0.3) == pytest.approx(-0.3)
    assert math.isnan(hull.e_above_hull(Composition("LiK"), -1.0))  # no reference for K


def test_self_reference_single_points_sit_on_or_above_hull(perov, shared_data, tmp_path):
    """Generated = reference (energies from CHGNet single points, MP elemental entries): each
    structure is the only compound of its system, so its energy above hull is max(0, E_form)."""
    from xtalgen.schema import EvaluateConfig

    elemental = shared_data / "mp_reference" / "mp_elemental_reference_entries.json.gz"
    assert load_elemental_entries(elemental)["O"] < 0
    cfg = EvaluateConfig(cache_dir=str(tmp_path), elemental_reference=str(elemental))
    structures = perov[:4]
    assert len({frozenset(s.composition.elements) for s in structures}) == 4
    rows, summary = evaluate_structures(structures, reference=structures, stability=True, cfg=cfg)
    for row in rows:
        assert row["e_above_hull"] == pytest.approx(max(0.0, row["formation_energy_per_atom"]), abs=1e-5)
        assert row["stable"] is bool(max(0.0, row["formation_energy_per_atom"]) < 0.1)
        assert row["novel"] is False and row["sun"] is False
    assert summary["novel_rate"] == 0.0
    # known answer from the formation energies alone (each compound alone in its system)
    expected = sum(max(0.0, r["formation_energy_per_atom"]) < 0.1 for r in rows) / len(rows)
    assert summary["stable_rate"] == pytest.approx(expected)
    # The cache holds one line per reference structure; a second evaluation reuses it.
    cached = list(tmp_path.rglob("chgnet-single_point.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 4
    rows_again, _ = evaluate_structures(structures, reference=structures, stability=True, cfg=cfg)
    assert len(cached[0].read_text().splitlines()) == 4
    assert [r["e_above_hull"] for r in rows_again] == [r["e_above_hull"] for r in rows]


# --- resume ------------------------------------------------------------------------------------------------
def test_resume_neither_loses_nor_duplicates(perov, tmp_path):
    log = tmp_path / "per_structure.jsonl"
    full_rows, _ = evaluate_structures(perov[:8], log_path=tmp_path / "full.jsonl")
    evaluate_structures(perov[:8], log_path=log)
    lines = log.read_text().splitlines()
    # Simulate a kill: 3 complete lines, then half of the fourth.
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    resumed_rows, _ = evaluate_structures(perov[:8], log_path=log)
    ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert sorted(ids) == sorted(str(i) for i in range(8)) and len(ids) == 8
    assert ids[:3] == [json.loads(line)["id"] for line in lines[:3]]  # kept, not redone
    assert resumed_rows == full_rows


# --- inputs, targets, CLI ---------------------------------------------------------------------------------
def _sampling_output(directory, structures, conditions) -> None:
    (directory / "cifs").mkdir(parents=True)
    with open(directory / "samples.jsonl", "w") as handle:
        for i, structure in enumerate(structures):
            identifier = f"{i:06d}"
            structure.to(filename=str(directory / "cifs" / f"{identifier}.cif"))
            handle.write(json.dumps({"id": identifier, "cif": f"cifs/{identifier}.cif",
                                     "conditions": conditions}) + "\n")


def test_sampling_output_targets(perov, tmp_path):
    from pymatgen.analysis.hhi import HHIModel
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    structures = perov[:4]
    target_system = "-".join(sorted(e.symbol for e in structures[0].composition.elements))
    target_group = SpacegroupAnalyzer(structures[0], symprec=0.1).get_space_group_number()
    conditions = {"chemical_system": target_system, "space_group": target_group, "hhi_score": "<=3000"}
    _sampling_output(tmp_path / "samples", structures, conditions)
    items = list(iter_structures(tmp_path / "samples"))
    assert [i.id for i in items] == ["000000", "000001", "000002", "000003"]
    from xtalgen.evaluation import evaluate_inputs

    rows, summary = evaluate_inputs(items, relax=False)
    hhi = [HHIModel().get_hhi_production(s.composition) for s in structures]
    assert [r["meets_hhi_score"] for r in rows] == [h <= 3000 for h in hhi]
    assert rows[0]["meets_chemical_system"] is True and rows[0]["meets_space_group"] is True
    assert summary["meets_chemical_system_rate"] == 0.25  # the other three are other systems
    assert meets_target("dft_mag_density", 0.2, 0.25) and not meets_target("dft_mag_density", 0.2, 0.1)
    assert meets_target("dft_band_gap", 3.0, None) is None


def test_extxyz_input_round_trip(perov, tmp_path):
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = []
    for i, structure in enumerate(perov[:3]):
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info["id"] = f"x{i}"
        frames.append(atoms)
    write(tmp_path / "samples.extxyz", frames, format="extxyz")
    items = list(iter_structures(tmp_path / "samples.extxyz"))
    assert [i.id for i in items] == ["x0", "x1", "x2"]
    for item, structure in zip(items, perov[:3]):
        assert np.allclose(item.structure.lattice.matrix, structure.lattice.matrix)
        assert item.structure.composition == structure.composition


def test_cli_writes_table_summary_and_plots(perov, tmp_path):
    from xtalgen.cli import main

    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    for i, structure in enumerate(perov[:4] + perov[:1]):  # one duplicate
        structure.to(filename=str(cif_dir / f"s{i}.cif"))
    (cif_dir / "broken.cif").write_text("data_broken\n_cell_length_a 3\n")
    out = tmp_path / "eval"
    # A dotted override after the options, as people type them.
    assert main(["evaluate", str(cif_dir), "--out", str(out), "--no-relax", "--no-progress", "symprec=0.01"]) == 0
    table = pd.read_csv(out / "per_structure.csv")
    assert len(table) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_structures"] == 6
    assert summary["unique_rate"] == pytest.approx(4 / 6)  # 4 distinct, 1 copy, 1 unparsable
    assert summary["valid_rate"] == pytest.approx(5 / 6)
    assert (out / "element_frequencies.png").stat().st_size > 0
    # Rerunning into the same folder with other settings would mix results: refused.
    assert main(["evaluate", str(cif_dir), "--out", str(out), "--no-progress", "relax_steps=3"]) == 2


# --- CDVAE metrics ----------------------------------------------------------------------------------------
def test_cdvae_set_against_itself(perov):
    metrics = cdvae_metrics(perov[:8], perov[:8], "perov_5")
    assert metrics["cov_recall"] == 1.0 and metrics["cov_precision"] == 1.0
    assert metrics["wdist_density"] == 0.0 and metrics["wdist_num_elements"] == 0.0
    assert metrics["validity"] == 1.0


def test_cdvae_disjoint_sets_do_not_cover(perov, carbon_val):
    carbons = _structures(carbon_val, 4)
    metrics = cdvae_metrics(carbons, perov[:6], "perov_5")
    assert metrics["cov_recall"] == 0.0 and metrics["cov_precision"] == 0.0
    # Against a point mass at 1 element, W1 is the mean distance from 1.
    elements = [len(s.composition.elements) for s in perov[:6]]
    assert metrics["wdist_num_elements"] == pytest.approx(np.mean(elements) - 1)


def test_fingerprints_known_answers(perov):
    # Magpie statistics of NaCl's atomic numbers: min 11, max 17, range 6, mean 14, avg_dev 3,
    # mode 11 (equal amounts: the smaller value).
    fingerprint = composition_fingerprint(Composition("NaCl"))
    assert fingerprint.shape == (132,)
    assert list(fingerprint[:6]) == [11, 17, 6, 14, 3, 11]
    # The structure fingerprint is a per-site average: a supercell gives the same vector.
    featurizer = CrystalNNFingerprint()
    single = featurizer.structure(perov[0])
    double = perov[0].copy()
    double.make_supercell([1, 1, 2])
    assert single.shape == (61,)
    assert np.allclose(single, featurizer.structure(double), atol=1e-8)
    scaled = CompositionScaler([1.0] * 132, [2.0] * 132).transform(np.full((1, 132), np.nan))
    assert np.all(scaled == 0.0)


def test_fingerprints_match_matminer_where_installed(perov, carbon_val):
    """Parity with the library CDVAE used (runs where matminer is importable)."""
    fingerprint = pytest.importorskip("matminer.featurizers.site.fingerprint")
    reference = fingerprint.CrystalNNFingerprint.from_preset("ops")
    ours = CrystalNNFingerprint()
    for structure in perov[:4] + _structures(carbon_val, 3):
        expected = np.mean([reference.featurize(structure, i) for i in range(len(structure))], axis=0)
        assert np.array_equal(ours.structure(structure), expected)


def test_cli_cdvae_metrics_with_cached_test_fingerprints(perov_val, tmp_path):
    from xtalgen.cli import main

    frame = pd.read_csv(perov_val, nrows=6, index_col=0)
    frame.to_csv(tmp_path / "test.csv")
    cif_dir = tmp_path / "gen"
    cif_dir.mkdir()
    for i, cif in enumerate(frame["cif"][:3]):
        (cif_dir / f"g{i}.cif").write_text(cif)
    results = []
    for run in range(2):  # the second run reads the test split's fingerprints from the cache
        out = tmp_path / f"eval{run}"
        argv = ["evaluate", str(cif_dir), "--out", str(out), "--no-relax", "--no-progress", "--no-plots",
                "--test-split", str(tmp_path / "test.csv"), f"cache_dir={tmp_path / 'cache'}"]
        assert main(argv) == 0
        results.append(json.loads((out / "summary.json").read_text())["cdvae"])
    assert len(list((tmp_path / "cache" / "cdvae").glob("*.npz"))) == 1
    assert results[0] == results[1]
    assert results[0]["dataset"] == "mp_20"  # nothing in the path names a CDVAE set
    # Generated = half of the test split: all 3 are covered and at least those 3 of 6 are recalled
    # (other perovskites may fall within the cutoffs too).
    assert results[0]["cov_precision"] == 1.0 and results[0]["cov_recall"] >= 0.5
