"""Validation, canonical form and properties, on real Perov-5 / Carbon-24 / MP-20 rows."""

from __future__ import annotations

import csv
import math
import sys
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.io.cif import CifParser

from xtalgen.datasets.canonical import canonicalize, wrap_fractional
from xtalgen.datasets.items import RawItem, Rejection
from xtalgen.datasets.properties import (
    PropertyError,
    chemical_system,
    convert_properties,
    convert_value,
    hhi_score,
)
from xtalgen.datasets.readers import iter_raw_items
from xtalgen.datasets.validation import REASON_CODES, parse_and_validate, parse_p1_cif
from xtalgen.record import CrystalRecord
from xtalgen.schema import PropertyColumn, ReaderConfig, ValidationConfig

csv.field_size_limit(sys.maxsize)
READER, VALIDATION = ReaderConfig(), ValidationConfig()


def _rows(path, n):
    with open(path, newline="") as handle:
        return list(islice(csv.DictReader(handle), n))


@pytest.fixture(scope="module")
def perov_cif(perov_val) -> str:
    return _rows(perov_val, 1)[0]["cif"]


def _item(payload, kind="cif", id="x", properties=None) -> RawItem:
    return RawItem(source=f"test:{id}", index=0, id=id, kind=kind, payload=payload,
                   properties=properties or {}, split=None)


def _validate(payload, kind="cif", properties=None, reader=READER, validation=VALIDATION):
    return parse_and_validate(_item(payload, kind, properties=properties), reader, validation)


def _replace_site(cif: str, old_line_start: str, new_line: str) -> str:
    lines = cif.splitlines()
    k = next(i for i, line in enumerate(lines) if line.strip().startswith(old_line_start))
    lines[k] = new_line
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# every reason code
# ---------------------------------------------------------------------------------------------
def _crafted_inputs(cif: str) -> list[tuple[str, RawItem]]:
    """(expected reason or 'ok', item) for each crafted input, built from one real Perov-5 CIF."""
    cd_line = next(line for line in cif.splitlines() if line.strip().startswith("Cd "))
    _, label, mult, x, y, z, occ = cd_line.split()
    n_line = next(line for line in cif.splitlines() if line.strip().startswith("N "))
    cases = {
        "ok": cif,
        "empty": "   \n",
        "bad_encoding": cif.replace("data_", "data_\udcff", 1),
        "unparsable": "this is not a CIF at all",
        "disordered": cif.replace(cd_line, f"  Cd  {label}  {mult}  {x}  {y}  {z}  0.5"),
        "unknown_element": cif.replace(cd_line, f"  Xx  Xx1  {mult}  {x}  {y}  {z}  {occ}"),
        "z_out_of_range": cif.replace(cd_line, f"  Md  Md1  {mult}  {x}  {y}  {z}  {occ}"),
        "non_finite": cif.replace(cd_line, f"  Cd  {label}  {mult}  nan  {y}  {z}  {occ}"),
        "bad_volume": _with_cell(cif, a=0.3, b=0.3, c=0.3),
        # the N line moved onto the Cd position: two atoms at distance 0
        "atoms_too_close": cif.replace(n_line, f"  N  N9  1  {x}  {y}  {z}  1"),
    }
    items = [(reason, _item(text, id=f"{reason}")) for reason, text in cases.items()]
    big = {"cell": np.eye(3) * 20, "numbers": [6] * 21, "frac_coords": np.random.default_rng(0).random((21, 3)) * 0.9}
    items.append(("too_many_atoms", _item(big, kind="atoms_dict", id="big")))
    items.append(("bad_property", _item(cif, id="prop", properties={"band_gap": "wide"})))
    items.append(("not_periodic", _item({"cell": np.eye(3) * 5, "numbers": [6], "positions": [[0, 0, 0]],
                                          "pbc": [True, True, False]}, kind="atoms_dict", id="slab")))
    return items


def _with_cell(cif: str, **lengths) -> str:
    out = []
    for line in cif.splitlines():
        for axis, value in lengths.items():
            if line.startswith(f"_cell_length_{axis} "):
                line = f"_cell_length_{axis}   {value}"
        out.append(line)
    return "\n".join(out) + "\n"


def test_every_reason_code_from_crafted_inputs(perov_cif):
    results = [(expected, _validate(item.payload, item.kind, item.properties)) for expected, item in _crafted_inputs(perov_cif)]
    for expected, result in results:
        got = "ok" if isinstance(result, CrystalRecord) else result.reason
        assert got == expected, (expected, result)
        if isinstance(result, Rejection):
            assert result.reason in REASON_CODES and result.detail
    accepted = sum(isinstance(r, CrystalRecord) for _, r in results)
    rejected = sum(isinstance(r, Rejection) for _, r in results)
    assert accepted + rejected == len(results) and accepted == 1


def test_reasons_through_a_csv_file_with_unreadable_inputs(tmp_path, perov_cif):
    """Reader + validation together: bad rows and unreadable files never stop the good rows."""
    items = _crafted_inputs(perov_cif)
    path = tmp_path / "crafted.csv"
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "material_id", "cif", "band_gap"])
        for k, (_, item) in enumerate(items):
            if item.kind == "cif":
                writer.writerow([k, item.id, item.payload, item.properties.get("band_gap", "")])
    inputs = [str(tmp_path / "missing.csv"), str(path), str(tmp_path / "notes.txt")]
    (tmp_path / "notes.txt").write_text("hello")
    stream = list(iter_raw_items(inputs, READER))
    results = [parse_and_validate(item, READER, VALIDATION) for item in stream]
    reasons = Counter("ok" if isinstance(r, CrystalRecord) else r.reason for r in results)
    expected = Counter(reason for reason, item in items if item.kind == "cif")
    expected["unreadable_file"] += 2
    assert reasons == expected
    assert sum(reasons.values()) == len(stream)
    assert [item.index for item in stream if isinstance(item, RawItem)] == list(range(1, len(stream) - 1))


def test_every_reason_code_is_documented():
    required = {"unparsable", "empty", "bad_encoding", "disordered", "unknown_element", "z_out_of_range",
                "non_finite", "bad_volume", "atoms_too_close", "too_many_atoms", "duplicate_id",
                "unreadable_file", "bad_property"}
    assert required <= set(REASON_CODES)


def test_min_distance_counts_periodic_images():
    # Two atoms 0.4 Å apart only across the cell boundary (x=0.01 and x=0.97 in a 10 Å cell).
    payload = {"cell": np.eye(3) * 10, "numbers": [6, 6], "frac_coords": [[0.01, 0, 0], [0.97, 0, 0]]}
    result = _validate(payload, kind="atoms_dict")
    assert isinstance(result, Rejection) and result.reason == "atoms_too_close"
    assert "0.4000" in result.detail
    payload["frac_coords"] = [[0.01, 0, 0], [0.9, 0, 0]]  # 1.1 Å apart: fine
    assert isinstance(_validate(payload, kind="atoms_dict"), CrystalRecord)
    # A single atom in a 0.45 Å cell is closer than 0.5 Å to its own image.
    tiny = {"cell": np.diag([0.45, 5, 5]), "numbers": [6], "frac_coords": [[0, 0, 0]]}
    assert _validate(tiny, kind="atoms_dict").reason == "atoms_too_close"


# ---------------------------------------------------------------------------------------------
# canonical form
# ---------------------------------------------------------------------------------------------
def test_wrap_is_strictly_below_one():
    frac = np.array([[-1e-17, 1.0, 2.5], [-0.0, 0.9999999999999999, -3.25]])
    wrapped = wrap_fractional(frac)
    assert (wrapped >= 0).all() and (wrapped < 1).all()
    assert wrapped.tolist() == [[0.0, 0.0, 0.5], [0.0, 0.9999999999999999, 0.75]]
    assert not np.signbit(wrapped).any()


def _assert_niggli(matrix: np.ndarray, original_lattice: Lattice) -> None:
    """Main Niggli conditions on the metric, as reduced as pymatgen's reduction, right-handed."""
    a, b, c = matrix
    tol = 1e-5 * max(a @ a, 1.0)
    assert a @ a <= b @ b + tol and b @ b <= c @ c + tol
    assert abs(2 * (b @ c)) <= b @ b + tol and abs(2 * (a @ c)) <= a @ a + tol and abs(2 * (a @ b)) <= a @ a + tol
    dots = np.array([b @ c, a @ c, a @ b])
    assert (dots > -tol).all() or (dots < tol).all()  # all-acute or all-non-acute (type I / II)
    # Same cell as pymatgen's reduction: a and b equal; c as short or shorter (near-90° angles
    # within the tolerance may let one implementation pick c + a where the other keeps c).
    reference = original_lattice.get_niggli_reduced_lattice()
    ours, theirs = sorted(np.linalg.norm(matrix, axis=1)), sorted(reference.abc)
    assert np.allclose(ours[:2], theirs[:2], atol=1e-6) and ours[2] <= theirs[2] + 1e-6
    assert np.linalg.det(matrix) > 0 and math.isclose(np.linalg.det(matrix), reference.volume, rel_tol=1e-9)


@pytest.mark.parametrize("fixture", ["perov_val", "carbon_val"])
def test_canonical_records_are_niggli_wrapped_sorted_and_the_same_structure(request, fixture):
    rows = _rows(request.getfixturevalue(fixture), 40)
    matcher = StructureMatcher(ltol=1e-3, stol=1e-3, angle_tol=0.1, primitive_cell=False, scale=False)
    validation = ValidationConfig(max_atoms=24)
    for row in rows:
        record = _validate(row["cif"], validation=validation)
        assert isinstance(record, CrystalRecord), record
        _assert_niggli(record.lattice, original_lattice=Lattice.from_parameters(*parse_p1_cif(row["cif"])[0]))
        assert (record.frac_coords >= 0).all() and (record.frac_coords < 1).all()
        keys = list(zip(record.atomic_numbers, *np.round(record.frac_coords, 6).T % 1.0))
        assert keys == sorted(keys)
        original = CifParser.from_str(row["cif"]).parse_structures(primitive=False)[0]
        assert matcher.fit(original, record.to_structure())
        assert math.isclose(record.volume, original.volume, rel_tol=1e-9)


def test_canonical_form_ignores_atom_order_rotation_and_cell_choice(perov_val, carbon_val):
    rows = _rows(perov_val, 3) + _rows(carbon_val, 3)
    matcher = StructureMatcher(ltol=1e-4, stol=1e-4, angle_tol=0.01, primitive_cell=False, scale=False)
    rng = np.random.default_rng(1)
    for row in rows:
        record = _validate(row["cif"], validation=ValidationConfig(max_atoms=24))
        structure = record.to_structure()
        lattice = structure.lattice.matrix
        order = rng.permutation(len(structure))
        # Same cell, atoms shuffled and shifted by lattice vectors, Cartesian frame rotated.
        rotation = _random_rotation(rng)
        shifted = structure.frac_coords[order] + rng.integers(-2, 3, (len(order), 3))
        same = canonicalize(lattice @ rotation.T, shifted, record.atomic_numbers[order])
        assert np.allclose(same[0], record.lattice, atol=1e-9)
        assert np.array_equal(same[2], record.atomic_numbers)
        assert np.allclose(same[1], record.frac_coords, atol=1e-9)
        # Another basis of the same lattice, (a, a+b, a+b+c): same Niggli metric, same structure.
        sheared = structure.copy()
        sheared.make_supercell([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
        other = canonicalize(sheared.lattice.matrix, sheared.frac_coords, sheared.atomic_numbers)
        assert np.allclose(sorted(Lattice(other[0]).abc), sorted(Lattice(record.lattice).abc), atol=1e-6)
        assert math.isclose(np.linalg.det(other[0]), record.volume, rel_tol=1e-9)
        assert matcher.fit(Structure(other[0], other[2], other[1]), structure)


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_fast_p1_parser_matches_pymatgen(perov_val, carbon_val, shared_data):
    rows = _rows(perov_val, 30) + _rows(carbon_val, 30) + _rows(shared_data / "mattergen" / "mp_20_sample.csv", 2)
    for row in rows:
        cell, frac, numbers = parse_p1_cif(row["cif"])
        reference = CifParser.from_str(row["cif"]).parse_structures(primitive=False)[0]
        assert np.allclose(Lattice.from_parameters(*cell).matrix, reference.lattice.matrix, atol=1e-6)
        ref_numbers = np.array([site.specie.Z for site in reference])
        assert sorted(numbers.tolist()) == sorted(ref_numbers.tolist())
        # CifParser groups sites by species and snaps values near 1/3, 2/3: match site by site.
        for z, f in zip(numbers, frac):
            delta = reference.frac_coords - f
            distance = np.abs(delta - np.round(delta)).max(axis=1)
            assert distance[ref_numbers == z].min() < 1e-4


def test_general_cifs_with_symmetry_go_through_pymatgen():
    # NaCl in its conventional Fm-3m setting: 8 atoms from 2 listed sites and 192 operations.
    structure = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    from pymatgen.io.cif import CifWriter

    text = str(CifWriter(structure, symprec=0.1))
    assert "_symmetry_equiv_pos_as_xyz" in text and "Fm-3m" in text
    record = _validate(text)
    assert isinstance(record, CrystalRecord)
    assert record.num_atoms == 8 and record.properties["chemical_system"] == "Cl-Na"


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
def test_mp20_columns_map_to_mattergen_names(shared_data):
    row = _rows(shared_data / "mattergen" / "mp_20_sample.csv", 1)[0]
    items = list(iter_raw_items([str(shared_data / "mattergen" / "mp_20_sample.csv")], READER))
    record = parse_and_validate(items[0], READER, VALIDATION)
    assert record.id == row["material_id"] == "mp-7735"
    assert record.properties == {
        "dft_band_gap": float(row["band_gap"]),
        "formation_energy_per_atom": float(row["formation_energy_per_atom"]),
        "energy_above_hull": float(row["e_above_hull"]),
        "space_group": int(row["spacegroup.number"]),
        "chemical_system": "-".join(sorted(eval_list(row["elements"]))),
    }
    assert isinstance(record.properties["space_group"], int)


def eval_list(text: str) -> list[str]:
    return [s.strip(" '\"") for s in text.strip("[]").split(",")]


def test_user_maps_any_column_without_code(perov_val):
    reader = ReaderConfig(properties=[PropertyColumn(column="dir_gap", name="dft_band_gap"),
                                      PropertyColumn(column="formula", name="formula", kind="str")],
                          compute_hhi=True)
    row = _rows(perov_val, 1)[0]
    item = next(iter(iter_raw_items([str(perov_val)], reader)))
    record = parse_and_validate(item, reader, VALIDATION)
    assert record.properties["dft_band_gap"] == float(row["dir_gap"])
    assert record.properties["formula"] == row["formula"]
    assert record.properties["hhi_score"] == pytest.approx(hhi_score(record.atomic_numbers))


def test_property_type_conversion():
    assert convert_value("166", "int") == 166 and convert_value("166.0", "int") == 166
    assert convert_value(" 1.5 ", "float") == 1.5 and convert_value(2, "float") == 2.0
    for missing in ("", "nan", "NaN", None):
        assert convert_value(missing, "float") is None
    for bad, kind in (("166.5", "int"), ("wide", "float"), ("inf", "float")):
        with pytest.raises(PropertyError):
            convert_value(bad, kind)
    reader = ReaderConfig(properties=[PropertyColumn(column="g", name="gap")])
    assert convert_properties({"g": "", "band_gap": "0.5"}, reader) == {"dft_band_gap": 0.5}
    assert convert_properties({"band_gap": "0.5"}, ReaderConfig(default_properties=False)) == {}


def test_hhi_of_known_compositions():
    from pymatgen.analysis.hhi import HHIModel

    table = HHIModel()
    # One element: its own tabulated production HHI. Ti is 1100 in the Gaultois et al. table.
    assert hhi_score([22, 22]) == pytest.approx(table.get_hhi_production(Composition("Ti")))
    assert hhi_score([22]) == pytest.approx(1100.0)
    # A compound: the mass-fraction-weighted mean of its elements' values.
    composition = Composition("SrTiO3")
    by_hand = sum(
        composition.get_wt_fraction(el) * table.get_hhi_production(Composition(el.symbol))
        for el in composition.elements
    )
    assert hhi_score([38, 22, 8, 8, 8]) == pytest.approx(by_hand)
    assert chemical_system([38, 22, 8, 8, 8]) == "O-Sr-Ti"
