"""Every reader on real rows: CSV layouts, CIF folders and zips, extxyz, ASE db, builtin AFLOW."""

from __future__ import annotations

import csv
import io
import sys
import zipfile
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ase.db import connect
from ase.io import write
from pymatgen.io.ase import AseAtomsAdaptor

from xtalgen.datasets.items import RawItem, Rejection
from xtalgen.datasets.readers import iter_raw_items
from xtalgen.datasets.validation import parse_and_validate
from xtalgen.record import CrystalRecord
from xtalgen.schema import ReaderConfig, ValidationConfig

csv.field_size_limit(sys.maxsize)
READER, VALIDATION = ReaderConfig(), ValidationConfig(max_atoms=24)


def _records(inputs, reader=READER) -> list[CrystalRecord | Rejection]:
    return [parse_and_validate(item, reader, VALIDATION) for item in iter_raw_items([str(i) for i in inputs], reader)]


def _first_rows(path: Path, n: int) -> list[dict]:
    with open(path, newline="") as handle:
        return list(islice(csv.DictReader(handle), n))


@pytest.mark.parametrize("relative", ["perov_5/val.csv", "carbon_24/test.csv", "mattergen/mp_20_sample.csv"])
def test_csv_layouts_give_one_item_per_row(shared_data, relative):
    path = shared_data / relative
    frame = pd.read_csv(path, index_col=0)
    items = list(iter_raw_items([str(path)], READER))
    assert len(items) == len(frame)
    assert [item.id for item in items] == frame["material_id"].astype(str).tolist()
    assert [item.index for item in items] == list(range(len(frame)))
    assert items[7 % len(items)].source == f"{path}:row {7 % len(items)}"
    assert {item.split for item in items} == {None if "sample" in relative else Path(relative).stem}
    assert all(item.kind == "cif" and item.payload.startswith("# generated using pymatgen") for item in items)


@pytest.fixture(scope="module")
def perov_rows(perov_val):
    return _first_rows(perov_val, 12)


@pytest.fixture(scope="module")
def csv_records(tmp_path_factory, perov_rows) -> list[CrystalRecord]:
    """The reference: records read from a CSV of the same rows."""
    path = tmp_path_factory.mktemp("csv") / "rows.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(perov_rows[0]))
        writer.writeheader()
        writer.writerows(perov_rows)
    records = _records([path])
    assert all(isinstance(r, CrystalRecord) for r in records)
    return records


def test_folder_and_zip_of_cifs_give_the_same_records(tmp_path, perov_rows, csv_records):
    folder = tmp_path / "cifs" / "train"
    folder.mkdir(parents=True)
    for row in perov_rows:
        (folder / f"{row['material_id']}.cif").write_text(row["cif"])
    (folder / "README.txt").write_text("not a structure: ignored")
    archive = tmp_path / "cifs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for row in perov_rows:
            zf.writestr(f"cifs/{row['material_id']}.cif", row["cif"])
    by_id = {r.id: r for r in csv_records}
    for source, split in ((tmp_path / "cifs", "train"), (archive, None)):
        items = list(iter_raw_items([str(source)], READER))
        assert {item.split for item in items} == {split}
        records = [parse_and_validate(item, READER, VALIDATION) for item in items]
        assert sorted(r.id for r in records) == sorted(by_id)
        for record in records:
            assert record.equals(by_id[record.id])


def _atoms_of(rows, records):
    for row, record in zip(rows, records):
        atoms = AseAtomsAdaptor.get_atoms(record.to_structure())
        atoms.info = {"material_id": row["material_id"], "band_gap": float(row["dir_gap"])}
        yield atoms


def _assert_same_structures(records, reference):
    assert len(records) == len(reference)
    for record, ref in zip(records, reference):
        assert isinstance(record, CrystalRecord), record
        assert record.id == ref.id
        assert np.allclose(record.lattice, ref.lattice, atol=1e-6)  # extxyz keeps 8 decimals
        assert np.array_equal(record.atomic_numbers, ref.atomic_numbers)
        delta = record.frac_coords - ref.frac_coords
        assert np.allclose(delta - np.round(delta), 0, atol=1e-6)


def test_extxyz_frames(tmp_path, perov_rows, csv_records):
    path = tmp_path / "frames.extxyz"
    write(path, list(_atoms_of(perov_rows, csv_records)), format="extxyz")
    items = list(iter_raw_items([str(path)], READER))
    assert [item.source for item in items] == [f"{path}:frame {k}" for k in range(len(perov_rows))]
    records = [parse_and_validate(item, READER, VALIDATION) for item in items]
    _assert_same_structures(records, csv_records)
    assert records[3].properties["dft_band_gap"] == float(perov_rows[3]["dir_gap"])


def test_extxyz_bad_frame_is_rejected_alone(tmp_path, perov_rows, csv_records):
    path = tmp_path / "frames.xyz"
    write(path, list(_atoms_of(perov_rows[:3], csv_records[:3])), format="extxyz")
    lines = path.read_text().splitlines(keepends=True)
    lines[2 + 7] = "Cd nonsense 1.0 2.0\n"  # an atom line of the second frame (5 atoms + 2 header lines)
    path.write_text("".join(lines))
    results = _records([path])
    assert [type(r).__name__ for r in results] == ["CrystalRecord", "Rejection", "CrystalRecord"]
    assert results[1].reason == "unparsable" and results[1].source.endswith("frame 1")


def test_ase_database_rows(tmp_path, perov_rows, csv_records):
    path = tmp_path / "structures.db"
    with connect(path) as db:
        for atoms in _atoms_of(perov_rows, csv_records):
            db.write(atoms, material_id=int(atoms.info["material_id"]), band_gap=atoms.info["band_gap"])
    items = list(iter_raw_items([str(path)], READER))
    assert all(item.kind == "atoms_dict" for item in items)
    records = [parse_and_validate(item, READER, VALIDATION) for item in items]
    _assert_same_structures(records, csv_records)
    assert records[0].properties["dft_band_gap"] == float(perov_rows[0]["dir_gap"])


def test_builtin_aflow_works_offline():
    items = list(iter_raw_items(["builtin:aflow"], READER))
    assert len(items) == 288 and len({item.id for item in items}) == 288
    results = [parse_and_validate(item, READER, ValidationConfig()) for item in items]
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert {r.reason for r in rejected} == {"too_many_atoms"}
    assert len(results) - len(rejected) == 250
    rocksalt = next(r for r in results if isinstance(r, CrystalRecord) and "cF8_225_a_b" in r.id)
    assert rocksalt.num_atoms == 2 and rocksalt.properties["chemical_system"] == "Cl-Na"  # B1, primitive
    assert list(iter_raw_items(["builtin:nothing"], READER))[0].reason == "unreadable_file"


def test_bad_bytes_reject_one_row_only(tmp_path, perov_rows):
    path = tmp_path / "mixed.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "material_id", "cif"])
        for k, row in enumerate(perov_rows[:4]):
            writer.writerow([k, row["material_id"], row["cif"]])
    data = path.read_bytes()
    second = data.index(f',{perov_rows[1]["material_id"]},"'.encode()) + len(perov_rows[1]["material_id"]) + 3
    third = data.index(f',{perov_rows[2]["material_id"]},"'.encode()) + len(perov_rows[2]["material_id"]) + 3
    data = data[:second] + b"\xff\xfe" + data[second:third] + b"\x00" + data[third:]
    path.write_bytes(data)
    results = _records([path])
    assert [getattr(r, "reason", "ok") for r in results] == ["ok", "bad_encoding", "bad_encoding", "ok"]


def test_unreadable_inputs_yield_one_rejection_each(tmp_path, perov_val):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "broken.db").write_bytes(b"not a database at all" * 10)
    (tmp_path / "no_cif.csv").write_text(",material_id,formula\n0,a,NaCl\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty_folder").mkdir()
    names = ["broken.zip", "broken.db", "no_cif.csv", "empty.csv", "missing.cif", "notes.pdf", "empty_folder"]
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    inputs = [str(tmp_path / n) for n in names] + [str(perov_val)]
    stream = list(iter_raw_items(inputs, READER))
    rejections = stream[: len(names)]
    assert all(isinstance(r, Rejection) and r.reason == "unreadable_file" for r in rejections)
    assert [r.source for r in rejections] == inputs[: len(names)]
    assert all(isinstance(item, RawItem) for item in stream[len(names):])
    assert len(stream) == len(names) + 3787


def test_readers_stream(perov_val):
    """The first item arrives without reading the rest: a generator, not a list."""
    stream = iter_raw_items([str(perov_val)] * 1000, READER)  # 3.8M rows if it were read whole
    first = list(islice(stream, 3))
    assert [item.index for item in first] == [0, 1, 2]


def test_pymatgen_structures_from_python(perov_rows, csv_records):
    from pymatgen.core import Lattice, Structure

    from xtalgen.datasets.readers import iter_structures

    structures = [record.to_structure() for record in csv_records]
    structures.append(Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]]))
    ids = [r.id for r in csv_records] + ["alloy"]
    props = [{"band_gap": row["dir_gap"]} for row in perov_rows] + [{}]
    results = [parse_and_validate(item, READER, VALIDATION) for item in iter_structures(structures, ids, props)]
    _assert_same_structures(results[:-1], csv_records)
    assert results[0].properties["dft_band_gap"] == float(perov_rows[0]["dir_gap"])
    assert results[-1].reason == "disordered" and results[-1].id == "alloy"


def test_csv_members_of_a_zip_are_streamed(tmp_path, perov_val):
    """A release zip (train.csv + val.csv inside a folder) can be read without unpacking it."""
    archive = tmp_path / "release.zip"
    with open(perov_val, newline="") as handle:
        lines = list(islice(csv.reader(handle), 6))
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for split, rows in (("train", lines[1:4]), ("val", lines[4:6])):
            with zf.open(f"release/{split}.csv", "w") as member, \
                    io.TextIOWrapper(member, encoding="utf-8", newline="") as text:
                csv.writer(text).writerows([lines[0], *rows])
    items = list(iter_raw_items([str(archive)], READER))
    assert [(item.split, item.id) for item in items] == [("train", r[1]) for r in lines[1:4]] + \
        [("val", r[1]) for r in lines[4:6]]
    assert items[3].source == f"{archive}:release/val.csv:row 0"
    assert all(isinstance(parse_and_validate(item, READER, VALIDATION), CrystalRecord) for item in items)
