"""Shard formats on real Perov-5 + Carbon-24 rows: exact round trips, deterministic bytes, manifest
statistics, corruption detection (verify and read time), subsets, crash safety."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.io.cif import CifParser

from xtalgen.record import CrystalRecord
from xtalgen.sharding import (
    ShardCorruptionError,
    ShardSetWriter,
    load_subset,
    make_subset,
    manifest_hash,
    open_shards,
    shard_stats,
    verify_shards,
)
from xtalgen.sharding.codec import record_key

FORMATS = ("lmdb", "webdataset")
SPLITS = ("train", "val")


def load_real_records(perov_csv: Path, carbon_csv: Path, n_each: int) -> list[CrystalRecord]:
    """Real rows; properties of every kind, some missing, so coverage counts are not trivial."""
    records = []
    for csv, kind in ((perov_csv, "perov"), (carbon_csv, "carbon")):
        for i, row in enumerate(pd.read_csv(csv, nrows=n_each).itertuples()):
            structure = CifParser.from_str(row.cif).parse_structures(primitive=False)[0]
            props = {"source": kind, "row": i}
            if kind == "perov":
                props["heat_all"] = float(row.heat_all)
                props["dir_gap"] = float(row.dir_gap) if i % 3 else math.nan  # NaN = missing
            else:
                props["energy_per_atom"] = float(row.energy_per_atom)
            records.append(CrystalRecord.from_structure(structure, id=f"{kind}-{row.material_id}", properties=props))
    return records


def split_of(i: int) -> str:
    return "val" if i % 7 == 0 else "train"


def write_set(out: Path, records, fmt: str, records_per_shard: int = 64) -> dict:
    writer = ShardSetWriter(out, fmt=fmt, records_per_shard=records_per_shard)
    for i, record in enumerate(records):
        writer.add(split_of(i), record)
    return writer.finalize(
        sources=[{"path": "perov_5/val.csv", "sha256": "ab" * 32, "bytes": 1}], rejected={"too_many_atoms": 2},
        config={"shard": {"format": fmt}},
    )


@pytest.fixture(scope="module")
def records(perov_val, carbon_val) -> list[CrystalRecord]:
    return load_real_records(perov_val, carbon_val, 150)


@pytest.fixture(scope="module", params=FORMATS)
def built(request, records, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(request.param)
    write_set(out, records, request.param)
    return out


def expected_by_split(records) -> dict[str, list[CrystalRecord]]:
    out = {s: [] for s in SPLITS}
    for i, r in enumerate(records):
        out[split_of(i)].append(r)
    return out


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_is_bitwise_exact(built, records):
    shards = open_shards(built)
    expected = expected_by_split(records)
    for split in SPLITS:
        back = list(shards.iter_records(split))
        assert len(back) == len(expected[split]) == shards.num_records(split)
        for got, want in zip(back, expected[split]):
            assert got.equals(want), want.id
    some = [5, 0, len(expected["train"]) - 1]
    assert [r.id for r in shards.get_records("train", some)] == [expected["train"][i].id for i in some]


def test_same_records_give_identical_bytes(records, tmp_path):
    for fmt in FORMATS:
        write_set(tmp_path / f"{fmt}-a", records, fmt)
        write_set(tmp_path / f"{fmt}-b", records, fmt)
        a, b = file_hashes(tmp_path / f"{fmt}-a"), file_hashes(tmp_path / f"{fmt}-b")
        assert a == b and len(a) >= 5


def test_manifest_describes_the_files_and_the_data(built, records):
    shards = open_shards(built)
    m = shards.manifest
    assert m["num_records"] == len(records) and m["rejected"] == {"too_many_atoms": 2}
    assert manifest_hash(built) == hashlib.sha256((built / "manifest.json").read_bytes()).hexdigest()
    for split in SPLITS:
        entries = shards.shards(split)
        assert sum(e["num_records"] for e in entries) == shards.num_records(split)
        for e in entries:
            data = (built / e["file"]).read_bytes()
            assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
    if shards.format == "webdataset":
        assert [e["num_records"] for e in shards.shards("train")][:-1] == [64] * (len(shards.shards("train")) - 1)
    train = expected_by_split(records)["train"]
    stats = shards.stats
    assert stats["num_atoms_histogram"] == dict(Counter(r.num_atoms for r in train))
    assert stats["mean_density"] == pytest.approx(np.mean([r.density for r in train]), rel=1e-12)
    assert stats["element_counts"] == dict(Counter(int(z) for r in train for z in r.atomic_numbers))
    assert stats["property_coverage"]["heat_all"] == sum("heat_all" in r.properties for r in train)
    assert stats["property_coverage"]["dir_gap"] == sum(
        "dir_gap" in r.properties and not math.isnan(r.properties["dir_gap"]) for r in train)
    assert np.array_equal(shards.num_atoms("val"), [r.num_atoms for r in expected_by_split(records)["val"]])
    assert shard_stats(built, recompute=True) == shard_stats(built)
    assert verify_shards(built).ok


def _flip_byte_inside_record(root: Path, shards, split: str, index: int) -> str:
    """Flip one byte in the middle of the stored value of record `index`; return the shard file."""
    value = shards.get_values(split, [index])[0]
    for entry in shards.shards(split):
        path = root / entry["file"]
        data = bytearray(path.read_bytes())
        at = data.find(value)
        if at >= 0:
            data[at + len(value) // 2] ^= 0x10
            path.write_bytes(bytes(data))
            return entry["file"]
    raise AssertionError("value not found in any shard file")


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_byte_is_named_by_verify_and_at_read(fmt, records, tmp_path):
    write_set(tmp_path, records, fmt)
    shards = open_shards(tmp_path)
    broken = _flip_byte_inside_record(tmp_path, shards, "train", 70)
    report = verify_shards(tmp_path)
    assert not report.ok and report.broken_shards == [broken]
    assert any(p.key == "000000070" for p in report.problems)
    with pytest.raises(ShardCorruptionError) as err:
        list(open_shards(tmp_path).iter_records("train"))
    assert err.value.shard == broken and err.value.key == "000000070"


def _overwrite(path: Path, at: int, length: int = 1) -> None:
    """Overwrite `length` bytes at `at` with other bytes (XOR 0xBE: never a no-op, often not UTF-8)."""
    data = bytearray(path.read_bytes())
    for i in range(at, min(at + length, len(data))):
        data[i] ^= 0xBE
    path.write_bytes(bytes(data))


# Where the damage goes: a fraction of the file (LMDB meta/branch/leaf pages, tar headers and
# padding), or the located bytes of record 5's key or value.
DAMAGE_SITES = ["0.0", "0.02", "0.3", "0.6", "0.99", "key", "value"]


@pytest.mark.parametrize("site", DAMAGE_SITES)
def test_overwritten_bytes_anywhere_end_in_a_verify_report_naming_the_shard(built, site, tmp_path, capfd):
    from xtalgen.cli import main

    root = tmp_path / "set"
    shutil.copytree(built, root)
    shards = open_shards(root)
    entry = shards.shards("train")[0]
    path = root / entry["file"]
    if site == "key":  # the LMDB key in its leaf page; the tar member name in its header
        at = path.read_bytes().find(record_key(5).encode())
    elif site == "value":
        at = path.read_bytes().find(shards.get_values("train", [5])[0]) + 40
    else:
        at = int(float(site) * (entry["bytes"] - 1))
    assert at >= 0
    _overwrite(path, at, length=4 if site == "value" else 1)

    assert main(["shard", "verify", str(root), "--quiet"]) == 1  # the documented exit for a broken set
    out, err = capfd.readouterr()  # capfd: also what the isolated LMDB reader process printed
    assert "Traceback" not in out + err and "error" not in err, err
    broken = [line.strip() for line in out.splitlines() if line.strip().startswith("BROKEN")]
    assert broken and all(line.startswith(f"BROKEN {entry['file']}") for line in broken), out
    if site in ("key", "value"):
        # Located damage is named down to the record: the value's own key, or the key before it.
        assert (f"[key {record_key(5)}]" if site == "value" else f"after key {record_key(4)}") in out, out
        with pytest.raises(ShardCorruptionError) as read_error:  # and reading names it the same way
            list(open_shards(root).iter_records("train"))
        assert read_error.value.shard == entry["file"]


@pytest.mark.slow
def test_a_byte_overwritten_at_any_of_hundreds_of_offsets_is_named_by_verify(built, tmp_path):
    """The sites above, swept: every 211th byte of the first train shard, one at a time."""
    root = tmp_path / "set"
    shutil.copytree(built, root)
    entry = open_shards(root).shards("train")[0]
    path = root / entry["file"]
    intact = path.read_bytes()
    unnamed = []
    for at in range(7, len(intact), 211):
        _overwrite(path, at)
        report = verify_shards(root)
        if report.broken_shards != [entry["file"]]:
            unnamed.append((at, report.summary()))
        path.write_bytes(intact)
    assert not unnamed, unnamed[:3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_shard_is_named(fmt, records, tmp_path):
    write_set(tmp_path, records, fmt)
    entry = open_shards(tmp_path).shards("train")[1 if fmt == "webdataset" else 0]
    path = tmp_path / entry["file"]
    path.write_bytes(path.read_bytes()[: entry["bytes"] // 2 + 100])
    report = verify_shards(tmp_path)
    assert report.broken_shards == [entry["file"]]
    with pytest.raises(ShardCorruptionError, match=entry["file"]):
        list(open_shards(tmp_path).iter_records("train"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_shard_is_named(fmt, records, tmp_path):
    write_set(tmp_path, records, fmt)
    entry = open_shards(tmp_path).shards("val")[-1]
    (tmp_path / entry["file"]).unlink()
    report = verify_shards(tmp_path)
    assert report.broken_shards == [entry["file"]] and "missing" in report.problems[0].detail
    with pytest.raises(ShardCorruptionError, match="missing"):
        list(open_shards(tmp_path).iter_records("val"))


def test_altered_atom_count_index_is_named(records, tmp_path):
    write_set(tmp_path, records, "lmdb")
    index = tmp_path / "index" / "train.num_atoms.npy"
    data = bytearray(index.read_bytes())
    data[-1] ^= 0x01
    index.write_bytes(bytes(data))
    report = verify_shards(tmp_path)
    assert report.broken_shards == ["index/train.num_atoms.npy"]


def test_unfinished_build_does_not_look_complete_and_rebuild_replaces_it(records, tmp_path):
    write_set(tmp_path, records, "webdataset", records_per_shard=16)
    old_shards = {e["file"] for e in open_shards(tmp_path).shards("train")}
    writer = ShardSetWriter(tmp_path, fmt="webdataset", records_per_shard=64)
    for record in records[:100]:
        writer.add("train", record)
    del writer  # "crash": never finalized; the old complete set is still what is on disk
    assert verify_shards(tmp_path).ok
    write_set(tmp_path, records, "webdataset", records_per_shard=64)
    new_shards = {e["file"] for e in open_shards(tmp_path).shards("train")}
    on_disk = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "wds").iterdir()}
    assert on_disk == new_shards | {e["file"] for e in open_shards(tmp_path).shards("val")}
    assert old_shards - new_shards and verify_shards(tmp_path).ok


def test_manifest_needed_to_open(tmp_path, records):
    writer = ShardSetWriter(tmp_path, fmt="lmdb")
    writer.add("train", records[0])
    with pytest.raises(FileNotFoundError, match="did not finish"):
        open_shards(tmp_path)


def test_property_subsets_are_deterministic_nested_views(built, records):
    train = expected_by_split(records)["train"]
    carrying = [i for i, r in enumerate(train) if not math.isnan(r.properties.get("dir_gap", math.nan))]
    full = load_subset(built, make_subset(built, "dir_gap"))
    assert full["splits"]["train"]["indices"].tolist() == carrying
    small = load_subset(built, make_subset(built, "dir_gap", max_n=20))
    mid = load_subset(built, make_subset(built, "dir_gap", max_n=40, split=None))
    assert small["splits"]["train"]["count"] == 20 and small["splits"]["train"]["available"] == len(carrying)
    assert set(small["splits"]["train"]["indices"]) <= set(mid["splits"]["train"]["indices"]) <= set(carrying)
    assert set(mid["splits"]) == set(SPLITS)
    again = json.loads((built / "subsets" / "dir_gap-20.json").read_text())
    assert again["splits"]["train"]["indices"] == small["splits"]["train"]["indices"].tolist()
    with pytest.raises(ValueError, match="carries"):
        make_subset(built, "no_such_property")


def test_subset_of_another_build_is_refused(records, tmp_path):
    write_set(tmp_path, records, "lmdb")
    make_subset(tmp_path, "heat_all", max_n=10)
    write_set(tmp_path, records[:200], "lmdb")
    with pytest.raises(ValueError, match="different build"):
        load_subset(tmp_path, "heat_all-10")


def test_damaged_tar_header_is_named(records, tmp_path):
    write_set(tmp_path, records, "webdataset")
    entry = open_shards(tmp_path).shards("train")[0]
    path = tmp_path / entry["file"]
    data = bytearray(path.read_bytes())
    data[124 + 5] ^= 0x01  # the size field of the first member's header
    path.write_bytes(bytes(data))
    assert verify_shards(tmp_path).broken_shards == [entry["file"]]
    with pytest.raises(ShardCorruptionError, match="damaged tar header at its start"):
        next(open_shards(tmp_path).iter_records("train"))


def test_webdataset_library_reads_the_tars(records, tmp_path):
    import webdataset as wds

    from xtalgen.record import decode_record

    write_set(tmp_path, records, "webdataset")
    shards = open_shards(tmp_path)
    urls = [str(tmp_path / e["file"]) for e in shards.shards("train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(shards.num_records("train"))]
    back = [decode_record(s["msgpack"]) for s in samples]  # plain msgpack; the crc entry is ignored
    assert all(a.equals(b) for a, b in zip(back, expected_by_split(records)["train"]))
