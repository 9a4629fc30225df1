"""Shard builds: counts, duplicates, splits, determinism across workers, resume after kill -9."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest

from xtalgen.datasets.build import BUILD_DIR, BuildStateError, assign_split, build_shards, hash_fraction
from xtalgen.schema import DataConfig, ShardConfig
from xtalgen.sharding import open_shards, read_manifest

csv.field_size_limit(sys.maxsize)


def _write_subset(src: Path, dst: Path, n: int, extra_rows: list[list[str]] = ()) -> None:
    with open(src, newline="") as f_in, open(dst, "w", newline="") as f_out:
        reader, writer = csv.reader(f_in), csv.writer(f_out)
        writer.writerow(next(reader))
        for row in islice(reader, n):
            writer.writerow(row)
        for row in extra_rows:
            writer.writerow(row)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, perov_val, carbon_val) -> list[str]:
    """~1,100 real structures in three files; one id repeated, one file named by its split."""
    folder = tmp_path_factory.mktemp("inputs")
    with open(perov_val, newline="") as f:
        first = next(islice(csv.reader(f), 1, 2))
    _write_subset(perov_val, folder / "perov_part.csv", 800, extra_rows=[first])  # duplicate id at the end
    _write_subset(carbon_val, folder / "val.csv", 300)
    return [str(folder / "perov_part.csv"), str(folder / "val.csv"), "builtin:aflow"]


def _cfg(chunk_size=128) -> DataConfig:
    cfg = DataConfig()
    cfg.shard.chunk_size = chunk_size
    return cfg


def _tree_bytes(folder: Path) -> dict[str, str]:
    """sha256 of every output file, `.build` excluded (it only holds the build's own state)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and BUILD_DIR not in p.relative_to(folder).parts
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs):
    out = tmp_path_factory.mktemp("reference") / "shards"
    summary = build_shards(inputs, out, _cfg(), fmt="lmdb", workers=1, progress=False)
    return out, summary


def test_counts_add_up_and_duplicates_are_rejected(reference, inputs):
    out, summary = reference
    assert summary.read == 801 + 300 + 288
    assert summary.read == summary.accepted + summary.rejected
    assert summary.by_reason["duplicate_id"] == 1
    assert summary.rejected == sum(summary.by_reason.values())
    with open(summary.rejects_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary.rejected
    duplicate = next(r for r in rows if r["reason"] == "duplicate_id")
    assert duplicate["source"].endswith("perov_part.csv:row 800")
    manifest = read_manifest(out)
    assert manifest["num_records"] == summary.accepted
    assert manifest["rejected"] == summary.by_reason
    assert [s["path"] for s in manifest["sources"]] == inputs
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(Path(inputs[0]).read_bytes()).hexdigest()
    shards = open_shards(out)
    assert sum(shards.num_records(s) for s in summary.by_split) == summary.accepted
    assert not list((out / BUILD_DIR).glob("chunk-*")), "chunk files are removed once the manifest is written"


def test_splits_follow_file_names_then_id_hash(reference, inputs):
    out, summary = reference
    shards = open_shards(out)
    with open(inputs[1], newline="") as f:  # named val.csv: its records keep the split "val"
        carbon_ids = {row["material_id"] for row in csv.DictReader(f)}
    with open(summary.rejects_path, newline="") as f:
        rejected_ids = {row["id"] for row in csv.DictReader(f)}
    val_ids = {record.id for record in shards.iter_records("val")}
    assert carbon_ids - rejected_ids <= val_ids and len(carbon_ids - rejected_ids) > 250
    for split in summary.by_split:
        ids = [record.id for record in shards.iter_records(split)]
        assert len(ids) == summary.by_split[split] == shards.num_records(split)
        for record_id in ids:
            if record_id not in carbon_ids:
                assert assign_split(record_id, None, ShardConfig()) == split


def test_hash_split_fractions_and_fixed_split():
    shard = ShardConfig()
    names = [assign_split(f"id-{k}", None, shard) for k in range(20000)]
    assert abs(names.count("train") / len(names) - 0.9) < 0.01
    assert abs(names.count("val") / len(names) - 0.05) < 0.005
    assert assign_split("x", "test", shard) == "test"
    assert assign_split("x", "test", ShardConfig(split="hash")) == assign_split("x", None, shard)
    assert assign_split("x", "test", ShardConfig(split="train")) == "train"
    assert 0 <= hash_fraction("anything") < 1


def test_workers_do_not_change_a_single_byte(reference, inputs, tmp_path):
    out, _ = reference
    parallel = tmp_path / "parallel"
    build_shards(inputs, parallel, _cfg(), fmt="lmdb", workers=2, progress=False)
    assert _tree_bytes(parallel) == _tree_bytes(out)


def test_webdataset_format_and_rerun_is_up_to_date(inputs, tmp_path):
    out = tmp_path / "wds"
    cfg = _cfg()
    cfg.shard.records_per_shard = 400
    first = build_shards(inputs, out, cfg, fmt="webdataset", workers=1, progress=False)
    assert len(list((out / "wds").glob("*.tar"))) >= 3
    before = _tree_bytes(out)
    again = build_shards(inputs, out, cfg, fmt="webdataset", workers=1, progress=False)
    assert again.to_dict() == first.to_dict() and _tree_bytes(out) == before


def test_other_inputs_in_the_same_folder_need_restart(inputs, tmp_path):
    out = tmp_path / "shards"
    (out / BUILD_DIR).mkdir(parents=True)
    (out / BUILD_DIR / "state.json").write_text(json.dumps({"fingerprint": "of another build"}))
    with pytest.raises(BuildStateError, match="restart"):
        build_shards(inputs[2:], out, _cfg(), workers=1, progress=False)
    summary = build_shards(inputs[2:], out, _cfg(), workers=1, progress=False, restart=True)
    assert summary.read == 288 and summary.by_reason == {"too_many_atoms": 38}
    # A finished build is simply rebuilt when its inputs change: no work can be lost.
    changed = build_shards(inputs[1:], out, _cfg(), workers=1, progress=False)
    assert changed.read == 300 + 288 and read_manifest(out)["num_records"] == changed.accepted


_BUILD_SCRIPT = """
import sys
from xtalgen.datasets.build import build_shards
from xtalgen.schema import DataConfig
cfg = DataConfig()
cfg.shard.chunk_size = int(sys.argv[2])
build_shards(sys.argv[3:], sys.argv[1], cfg, fmt="lmdb", workers=2, progress=False)
"""


def test_resume_after_kill_gives_the_same_bytes(reference, inputs, tmp_path):
    out, _ = reference
    resumed = tmp_path / "resumed"
    # Chunks of 4 (348 of them) so the build is reliably killed halfway, not after it finished.
    process = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(resumed), "4", *inputs],
                               start_new_session=True)
    build_dir = resumed / BUILD_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(build_dir.glob("chunk-*.msgpack"))) >= 6:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the build and its worker processes, as a crash would
    process.wait()
    done = len(list(build_dir.glob("chunk-*.msgpack")))
    assert 6 <= done < 348 and not (resumed / "manifest.json").exists(), "the build was not killed halfway"
    summary = build_shards(inputs, resumed, _cfg(chunk_size=4), fmt="lmdb", workers=1, progress=False)
    # Same records, same order, same bytes as the uninterrupted build (its chunk size was 128:
    # the output does not depend on it either, only the resume bookkeeping does).
    reference_bytes = _tree_bytes(out)
    resumed_bytes = _tree_bytes(resumed)
    assert resumed_bytes.keys() == reference_bytes.keys()
    differing = {k for k in reference_bytes if reference_bytes[k] != resumed_bytes[k]}
    assert differing <= {"manifest.json"}
    a, b = read_manifest(out), read_manifest(resumed)
    assert a["config"]["shard"]["chunk_size"] == 128 and b["config"]["shard"]["chunk_size"] == 4
    a["config"]["shard"]["chunk_size"] = b["config"]["shard"]["chunk_size"] = None
    assert a == b
    assert summary.read == summary.accepted + summary.rejected == 801 + 300 + 288


def test_undecodable_bytes_never_stop_a_build(tmp_path, perov_val):
    """Invalid UTF-8 in an id, a CIF, or a file name: rejected as bad_encoding, reported legibly."""
    with open(perov_val, newline="") as f:
        rows = list(islice(csv.reader(f), 4))
    header, good, bad_id, bad_cif = rows
    path = tmp_path / "mixed.csv"
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerow(good)
        writer.writerow([bad_id[0], "id-\udcff", *bad_id[2:]])
        writer.writerow([bad_cif[0], bad_cif[1], bad_cif[2].replace("data_", "data_\udcfe"), *bad_cif[3:]])
    odd_name = tmp_path / "caf\udce9.csv"
    with open(odd_name, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("no cif column here\n")
    summary = build_shards([str(path), str(odd_name)], tmp_path / "out", _cfg(), workers=1, progress=False)
    assert (summary.read, summary.accepted) == (4, 1)
    assert summary.by_reason == {"bad_encoding": 2, "unreadable_file": 1}
    with open(summary.rejects_path, encoding="utf-8", newline="") as f:
        rejects = list(csv.DictReader(f))
    assert [r["id"] for r in rejects[:2]] == ["id-\\xff", bad_cif[1]]
    assert rejects[2]["source"].endswith("caf\\xe9.csv")


def test_output_folder_inside_an_input_folder_is_not_read(tmp_path, perov_val):
    data = tmp_path / "data"
    data.mkdir()
    _write_subset(perov_val, data / "perov.csv", 20)
    first = build_shards([str(data)], data / "shards", _cfg(), workers=1, progress=False)
    assert (data / "shards" / "rejects.csv").exists() and first.read == 20
    again = build_shards([str(data)], data / "shards", _cfg(), workers=1, progress=False)  # up to date
    assert again.to_dict() == first.to_dict()
