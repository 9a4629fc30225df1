"""CrystalLoader on real Perov-5 + Carbon-24 shards: exact collation, exactly-once coverage over
ranks and DataLoader workers, seeded shuffles, exact resume, atom budgets, subsets, corruption."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.io.cif import CifParser

from xtalgen.batch import collate
from xtalgen.datasets.loader import CrystalLoader, collate_values, pack_batches
from xtalgen.record import CrystalRecord
from xtalgen.schema import LoaderConfig
from xtalgen.sharding import ShardCorruptionError, ShardSetWriter, make_subset, open_shards


def load_real_records(perov_csv: Path, carbon_csv: Path, n_each: int) -> list[CrystalRecord]:
    records = []
    for csv, kind in ((perov_csv, "perov"), (carbon_csv, "carbon")):
        for i, row in enumerate(pd.read_csv(csv, nrows=n_each).itertuples()):
            structure = CifParser.from_str(row.cif).parse_structures(primitive=False)[0]
            props = {"row": i, "energy": float(getattr(row, "heat_all", getattr(row, "energy_per_atom", 0.0)))}
            if i % 4:
                props["gap"] = float(getattr(row, "dir_gap", 1.5))
            records.append(CrystalRecord.from_structure(structure, id=f"{kind}-{row.material_id}", properties=props))
    # Interleave the 5-atom perovskites with the 6-24-atom carbons so batches mix sizes.
    half = len(records) // 2
    return [r for pair in zip(records[:half], records[half:]) for r in pair]


@pytest.fixture(scope="module")
def records(perov_val, carbon_val):
    return load_real_records(perov_val, carbon_val, 200)


def build(out: Path, records, fmt: str, records_per_shard: int = 40) -> Path:
    writer = ShardSetWriter(out, fmt=fmt, records_per_shard=records_per_shard)
    for r in records:
        writer.add("train", r)
    writer.finalize()
    return out


@pytest.fixture(scope="module")
def lmdb_dir(records, tmp_path_factory):
    return build(tmp_path_factory.mktemp("lmdb"), records, "lmdb")


@pytest.fixture(scope="module")
def wds_dir(records, tmp_path_factory):
    return build(tmp_path_factory.mktemp("wds"), records, "webdataset")


def ids_of(batches) -> list[str]:
    return [i for b in batches for i in b.ids]


def batches_equal(a, b) -> bool:
    return a.ids == b.ids and all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("lattice", "frac_coords", "atomic_numbers", "num_atoms", "batch_index"))


def test_fast_collation_equals_reference_collate(lmdb_dir, records):
    shards = open_shards(lmdb_dir)
    idx = [3, 0, 17, 250, 8]
    fast = collate_values(shards.get_values("train", idx), idx, "lmdb/train.lmdb", ["gap", "row", "energy"])
    ref = collate([records[i] for i in idx], ["gap", "row", "energy"])
    assert batches_equal(fast, ref)
    for name in ("gap", "row", "energy"):
        assert torch.equal(fast.properties[name], ref.properties[name]) and fast.properties[name].dtype == ref.properties[name].dtype
        assert torch.equal(fast.property_mask[name], ref.property_mask[name])


def test_chemical_systems_collate_to_multi_hot(tmp_path, records):
    tagged = [CrystalRecord(r.id, r.lattice, r.frac_coords, r.atomic_numbers,
                            {"chemical_system": "-".join(sorted({str(z) for z in r.to_structure().symbol_set}))}
                            if i % 2 else {})
              for i, r in enumerate(records[:6])]
    build(tmp_path, tagged, "lmdb")
    batch = next(iter(CrystalLoader(tmp_path, batch_size=6, shuffle=False, property_names=["chemical_system"])))
    hot, mask = batch.properties["chemical_system"], batch.property_mask["chemical_system"]
    assert hot.shape == (6, 100) and mask.tolist() == [False, True] * 3
    for row, record in enumerate(tagged):
        expected = set((np.unique(record.atomic_numbers) - 1).tolist()) if mask[row] else set()
        assert set(torch.nonzero(hot[row]).flatten().tolist()) == expected


def test_pack_batches_respects_count_and_atom_budget():
    n = np.array([5, 5, 24, 30, 6, 6, 6, 1, 8], dtype=np.uint16)
    bounds = pack_batches(n, batch_size=3, max_atoms=24)
    sizes = [n[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    assert [s.tolist() for s in sizes] == [[5, 5], [24], [30], [6, 6, 6], [1, 8]]
    assert pack_batches(n, batch_size=4).tolist() == [0, 4, 8, 9]
    assert pack_batches(n, batch_size=4, drop_last=True).tolist() == [0, 4, 8]


def test_lmdb_two_ranks_cover_every_record_once_within_atom_budget(lmdb_dir, records):
    seen = []
    for rank in range(2):
        loader = CrystalLoader(lmdb_dir, batch_size=16, max_atoms_per_batch=120, rank=rank, world_size=2, seed=3)
        expected_batches = len(loader)
        batches = list(loader)
        assert len(batches) == expected_batches and loader.epoch == 1
        assert all(b.num_atoms_total <= 120 and b.num_structures <= 16 for b in batches)
        seen += ids_of(batches)
    assert Counter(seen) == Counter(r.id for r in records)


def test_lmdb_with_dataloader_workers_gives_the_same_batches(lmdb_dir):
    open_shards(lmdb_dir).get_values("train", [0])  # the parent has the file open before workers fork
    plain = list(CrystalLoader(lmdb_dir, batch_size=16, seed=1, rank=1, world_size=2))
    workers = list(CrystalLoader(lmdb_dir, batch_size=16, seed=1, rank=1, world_size=2, num_workers=2))
    assert len(plain) == len(workers) and all(batches_equal(a, b) for a, b in zip(plain, workers))


def test_webdataset_two_ranks_two_workers_cover_every_record_once(wds_dir, records):
    seen = []
    for rank in range(2):
        loader = CrystalLoader(wds_dir, batch_size=12, max_atoms_per_batch=100, rank=rank, world_size=2,
                               num_workers=2, shuffle_buffer=32, seed=5)
        expected_batches = len(loader)
        batches = list(loader)
        assert len(batches) == expected_batches
        assert all(b.num_atoms_total <= 100 for b in batches)
        seen += ids_of(batches)
    assert Counter(seen) == Counter(r.id for r in records)


def test_fewer_shards_than_streams_still_feed_every_rank_and_worker(records, tmp_path):
    root = build(tmp_path, records, "webdataset", records_per_shard=300)  # 2 shards, 4 streams
    options = dict(batch_size=9, shuffle_buffer=50, seed=4, num_workers=2, world_size=2)
    seen = []
    for rank in range(2):
        loader = CrystalLoader(root, rank=rank, **options)
        assert all(p.num_batches > 0 for p in loader._plan())  # no idle worker
        seen += ids_of(loader)
    assert Counter(seen) == Counter(r.id for r in records)
    reference = list(CrystalLoader(root, rank=1, **options))
    interrupted = CrystalLoader(root, rank=1, **options)
    stream = iter(interrupted)
    head = [next(stream) for _ in range(7)]
    resumed = CrystalLoader(root, rank=1, **options)
    resumed.load_state_dict(interrupted.state_dict())
    assert all(batches_equal(a, b) for a, b in zip(head + list(resumed), reference, strict=True))


@pytest.mark.parametrize("fmt_dir", ["lmdb_dir", "wds_dir"])
def test_seeded_shuffle_is_reproducible_and_changes_with_epoch(fmt_dir, request):
    root = request.getfixturevalue(fmt_dir)

    def order(seed, epoch):
        loader = CrystalLoader(root, batch_size=8, seed=seed, shuffle_buffer=64)
        loader.set_epoch(epoch)
        return ids_of(loader)

    first = order(0, 0)
    assert first == order(0, 0)
    assert first != order(0, 1) and first != order(1, 0)
    assert sorted(first) == sorted(order(0, 1))
    unshuffled = ids_of(CrystalLoader(root, batch_size=8, shuffle=False))
    assert first != unshuffled and sorted(first) == sorted(unshuffled)


@pytest.mark.parametrize("fmt_dir,workers", [("lmdb_dir", 0), ("wds_dir", 0), ("wds_dir", 2)])
def test_resume_from_state_dict_continues_the_same_batches(fmt_dir, workers, request):
    root = request.getfixturevalue(fmt_dir)
    options = dict(batch_size=10, max_atoms_per_batch=90, seed=7, shuffle_buffer=48, num_workers=workers,
                   rank=1, world_size=2)
    straight = CrystalLoader(root, **options)
    straight.set_epoch(2)
    reference = list(straight)
    assert len(reference) > 6

    interrupted = CrystalLoader(root, **options)
    interrupted.set_epoch(2)
    stream = iter(interrupted)
    head = [next(stream) for _ in range(5)]
    state = interrupted.state_dict()
    del stream

    resumed = CrystalLoader(root, **options)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what a trainer does at the top of its epoch loop: no reset
    tail = list(resumed)
    assert len(head) + len(tail) == len(reference)
    assert all(batches_equal(a, b) for a, b in zip(head + tail, reference))
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0

    changed = CrystalLoader(root, **{**options, "seed": 8})
    with pytest.raises(ValueError, match="seed"):
        changed.load_state_dict(state)


@pytest.mark.parametrize("fmt_dir", ["lmdb_dir", "wds_dir"])
def test_drop_last_drops_only_each_streams_short_final_batch(fmt_dir, request, records):
    root = request.getfixturevalue(fmt_dir)
    kept = list(CrystalLoader(root, batch_size=16, drop_last=True, seed=2, shuffle_buffer=40))
    full = list(CrystalLoader(root, batch_size=16, seed=2, shuffle_buffer=40))
    assert all(b.num_structures == 16 for b in kept)
    assert all(batches_equal(a, b) for a, b in zip(kept, full))
    assert len(full) == len(kept) + (len(records) % 16 != 0)


@pytest.mark.parametrize("fmt_dir", ["lmdb_dir", "wds_dir"])
def test_subset_loader_reads_exactly_the_subset(fmt_dir, request, records):
    root = request.getfixturevalue(fmt_dir)
    make_subset(root, "gap", max_n=100)
    seen = []
    for rank in range(2):
        seen += ids_of(CrystalLoader(root, batch_size=7, subset="gap-100", rank=rank, world_size=2,
                                     property_names=["gap"]))
    assert len(seen) == len(set(seen)) == 100
    carrying = {r.id for r in records if not math.isnan(r.properties.get("gap", math.nan))}
    assert set(seen) <= carrying


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fmt", ["lmdb", "webdataset"])
def test_flipped_byte_fails_at_read_naming_shard_and_key(fmt, workers, records, tmp_path):
    root = build(tmp_path, records[:120], fmt)
    shards = open_shards(root)
    value = shards.get_values("train", [45])[0]
    entry = next(e for e in shards.shards("train") if e["first_index"] <= 45 < e["first_index"] + e["num_records"])
    path = root / entry["file"]
    data = bytearray(path.read_bytes())
    data[data.find(value) + 40] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptionError) as err:
        list(CrystalLoader(root, batch_size=8, shuffle=False, verify_checksums=False, num_workers=workers))
    # The same typed error, shard and key whether a DataLoader worker or this process read it.
    assert err.value.shard == entry["file"] and err.value.key == "000000045"
    if fmt == "lmdb":  # by default the whole file is checked before LMDB maps it
        with pytest.raises(ShardCorruptionError, match="sha256") as err:
            CrystalLoader(root, batch_size=8)
        assert err.value.shard == entry["file"]


def test_manifest_stats_and_config(lmdb_dir, records):
    loader = CrystalLoader.from_config(lmdb_dir, LoaderConfig(batch_size=5, seed=2), rank=0, world_size=1)
    stats = loader.manifest_stats
    assert stats["num_atoms_histogram"] == dict(Counter(r.num_atoms for r in records))
    assert stats["mean_density"] == pytest.approx(np.mean([r.density for r in records]), rel=1e-12)
    assert loader.batch_size == 5 and loader.num_records == len(records)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lmdb", "webdataset"])
def test_loader_memory_stays_flat_as_the_set_grows_tenfold(fmt, tmp_path):
    """The benchmark's measuring process reads 20k then 200k simulated records: the loader's own
    (anonymous) memory may grow only by its O(n) int64 index, never by records or keys."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "shard_read.py"
    out = subprocess.run([sys.executable, str(script), "--format", fmt, "--n", "20000,200000",
                          "--work-dir", str(tmp_path)], check=True, capture_output=True, text=True).stdout
    small, large = json.loads(out)["runs"]
    assert small["structures"] == 20000 and large["structures"] == 200000
    index_mib = 200000 * 8 * 4 / 2**20  # a few int64 arrays over the records (plan, order, bounds)
    assert large["peak_rss_anon_mib"] - small["peak_rss_anon_mib"] < index_mib + 8
