"""`CrystalLoader`: one loader over LMDB and WebDataset shard sets, yielding flat `CrystalBatch`es.

    loader = CrystalLoader("shards/perov", split="train", batch_size=32, max_atoms_per_batch=512,
                           rank=rank, world_size=world, num_workers=2, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader: ...
    ckpt["loader"] = loader.state_dict()          # epoch + position; resume continues the stream
    loader.load_state_dict(ckpt["loader"])         # later: the same batches follow, bit for bit

Iterating yields the rest of the current epoch and then moves to the next, so a step-based
trainer may simply iterate again; `set_epoch(e)` for the current epoch is a no-op (safe after
resume). `property_names` become `batch.properties` / `batch.property_mask`: numbers as (B,)
tensors, chemical systems ("Co-Li-O") as (B, 100) multi-hot.

How an epoch is laid out (everything follows from `seed`, the epoch and the manifest's per-record
atom counts, so it is computed up front in the main process, without reading any record):

* LMDB (map-style): the split's indices (or a subset's) are permuted with a seeded generator;
  rank r takes every world_size-th one from position r. Ranks differ by at most one record.
  Batches are formed greedily in that order; each batch is one item of a torch `Dataset` that
  DataLoader workers fetch by random access.
* WebDataset (iterable): tar shards are permuted per epoch and dealt to the world_size *
  num_workers streams, (rank, worker) -> stream rank * workers + worker (with fewer shards than
  streams, shards are cut into contiguous pieces first); each stream reads its shards
  sequentially and shuffles within consecutive windows of `shuffle_buffer` records (a block
  shuffle: same memory as a shuffle buffer, and the order is a pure function of the seed, so a
  resumed stream can skip whole shards without reading them). All streams of a rank are padded
  with empty items to the same length, so DataLoader's round-robin over workers gives one
  well-defined batch order; the padding is dropped here and never reaches the caller.
  Streams differ by at most one shard (or piece) of records: many shards per stream balance best.

Every record of the split (or subset) is read exactly once per epoch by exactly one (rank,
worker); nothing is duplicated to even out ranks, so ranks may yield different numbers of batches
(with an atom budget they would anyway): train by steps, not by `len(loader)`. The only records
not read are those of a final short batch per stream when `drop_last=True`.

Damage is reported as `ShardCorruptionError` naming the shard and key: every value's crc32 is
checked as it is decoded, tar shards are checked (structure, count, sha256) as they stream, and an
LMDB split file is checked against its sha256 once when the loader is created
(`verify_checksums`), because LMDB would crash rather than raise on a damaged page.

WebDataset sets may also sit behind an `http(s)://` base URL or a `pipe:` command template
(`xtalgen.sharding.remote`): the manifest and index are fetched once in the main process, and each
stream opens its shards over the network instead of from disk. Nothing else changes: the plan is
computed from the same manifest, so the rank/worker split, the batches and `state_dict()` are those
of the same set on disk (a resumed stream skips whole shards without fetching them), and a shard
that cannot be fetched raises `ShardUnavailableError` (a ShardCorruptionError) naming the URL or
command.

Batches hold at most `batch_size` structures and, when `max_atoms_per_batch > 0`, at most that many
atoms; a structure larger than the budget on its own forms a batch alone (never dropped).
Collation decodes straight into numpy (one join per field per batch, no per-atom Python).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from xtalgen.batch import CrystalBatch
from xtalgen.property_encoding import encode_column
from xtalgen.sharding import ShardCorruptionError, ShardUnavailableError, load_subset, open_shards
from xtalgen.sharding.codec import check, record_key, unpack
from xtalgen.sharding.manifest import file_sha256
from xtalgen.sharding.reader import check_file_size
from xtalgen.sharding.webdataset_format import iter_tar_entry

STATE_VERSION = 1


# --- collation ---------------------------------------------------------------------------------------
def collate_values(
    values: Sequence[bytes], indices: Sequence[int], shard: str, property_names: Sequence[str] = (),
    checked: bool = False,
) -> CrystalBatch:
    """Sealed record values -> CrystalBatch, equal bit for bit to `xtalgen.batch.collate` of the
    decoded records, without building a CrystalRecord per structure. `checked`: the values' crc32
    was verified already (where the shard name was known)."""
    return to_batch(decode_arrays(values, indices, shard, property_names, checked))


def decode_arrays(
    values: Sequence[bytes], indices: Sequence[int], shard: str, property_names: Sequence[str] = (),
    checked: bool = False,
) -> dict:
    """The batch as plain numpy arrays (one join per field, no per-atom Python).

    DataLoader workers return this rather than tensors: numpy arrays travel to the main process
    pickled by value (~10 µs for a batch), whereas each tensor would get its own shared-memory
    segment (~1 ms each), which made workers slower than no workers.
    """
    payloads = [unpack(v, shard, record_key(int(i)), checked) for v, i in zip(values, indices)]
    num_atoms = np.fromiter((p["n"] for p in payloads), dtype=np.int64, count=len(payloads))
    total = int(num_atoms.sum())
    try:  # astype copies: tensors get their own writable memory
        lattice = np.frombuffer(b"".join(p["lattice"] for p in payloads), "<f8").astype(np.float64)
        frac = np.frombuffer(b"".join(p["frac"] for p in payloads), "<f8").astype(np.float64)
        z = np.frombuffer(b"".join(p["z"] for p in payloads), "<u1").astype(np.int64)
        lattice, frac = lattice.reshape(len(payloads), 3, 3), frac.reshape(total, 3)
        if z.shape != (total,):
            raise ValueError(f"{z.shape[0]} atomic numbers for {total} atoms")
    except ValueError as exc:  # intact crc but inconsistent arrays: written by something else
        raise ShardCorruptionError(shard, f"inconsistent record arrays in batch: {exc}") from exc
    props, masks = {}, {}
    for name in property_names:
        props[name], masks[name] = encode_column([p["props"].get(name) for p in payloads], name)
    return {"lattice": lattice, "frac_coords": frac, "atomic_numbers": z, "num_atoms": num_atoms,
            "ids": [p["id"] for p in payloads], "properties": props, "property_mask": masks}


def to_batch(arrays: dict) -> CrystalBatch:
    """`decode_arrays` output -> CrystalBatch (zero-copy: tensors share the arrays' memory)."""
    num_atoms = arrays["num_atoms"]
    return CrystalBatch(
        lattice=torch.from_numpy(arrays["lattice"]),
        frac_coords=torch.from_numpy(arrays["frac_coords"]),
        atomic_numbers=torch.from_numpy(arrays["atomic_numbers"]),
        num_atoms=torch.from_numpy(num_atoms),
        batch_index=torch.from_numpy(np.repeat(np.arange(len(num_atoms), dtype=np.int64), num_atoms)),
        ids=arrays["ids"],
        properties={k: torch.from_numpy(v) for k, v in arrays["properties"].items()},
        property_mask={k: torch.from_numpy(v) for k, v in arrays["property_mask"].items()},
    )


def _keep_arrays(item):
    """DataLoader `collate_fn`: leave worker output as numpy (see `decode_arrays`)."""
    return item


# DataLoader re-raises a worker's exception in the main process as a RuntimeError holding the
# worker's traceback as text: ShardCorruptionError's type, shard and key would be lost. Workers
# therefore hand damage back as an item, and `CrystalLoader.__iter__` raises it there (the class by
# name: a shard that could not be fetched stays a ShardUnavailableError).
_DAMAGE = "shard_corruption"
_DAMAGE_TYPES = {cls.__name__: cls for cls in (ShardCorruptionError, ShardUnavailableError)}


def _damage_item(exc: ShardCorruptionError) -> dict:
    return {_DAMAGE: (type(exc).__name__, exc.shard, exc.detail, exc.key)}


def _raise_damage(item: dict) -> None:
    kind, *fields = item[_DAMAGE]
    raise _DAMAGE_TYPES.get(kind, ShardCorruptionError)(*fields)


# --- epoch plans -------------------------------------------------------------------------------------
def pack_batches(num_atoms: np.ndarray, batch_size: int, max_atoms: int = 0, drop_last: bool = False) -> np.ndarray:
    """Greedy batches over records in the given order: (num_batches + 1,) boundaries into it.

    A batch closes when it holds `batch_size` structures or the next structure would take it past
    `max_atoms` (0 = no budget). A structure alone over the budget gets its own batch.
    """
    bounds = [0]
    count = atoms = 0
    for i, n in enumerate(num_atoms.tolist()):
        if count and (count == batch_size or (max_atoms and atoms + n > max_atoms)):
            bounds.append(i)
            count = atoms = 0
        count += 1
        atoms += n
    if count and not (drop_last and count < batch_size):
        bounds.append(len(num_atoms))
    return np.asarray(bounds, dtype=np.int64)


@dataclass
class StreamPlan:
    """What one WebDataset stream reads in an epoch and how it batches it."""

    shards: list[dict]  # manifest entries, in read order
    shard_indices: list[np.ndarray]  # per shard: record indices it contributes (ascending)
    read_order: np.ndarray  # (L,) record indices in the order they come off the tars
    order: np.ndarray  # (L,) the same indices after the window shuffle: batch order
    bounds: np.ndarray  # (num_batches + 1,) batch boundaries into `order`

    @property
    def num_batches(self) -> int:
        return len(self.bounds) - 1


# --- datasets run inside DataLoader workers ----------------------------------------------------------
class _LmdbBatches(Dataset):
    """Map-style: item b is batch b of the rank's epoch plan, read by random access."""

    def __init__(self, reader, shard: str, order: np.ndarray, bounds: np.ndarray, property_names):
        self.reader, self.shard, self.order, self.bounds = reader, shard, order, bounds
        self.property_names = tuple(property_names)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, b: int) -> dict:
        indices = self.order[self.bounds[b] : self.bounds[b + 1]]
        try:
            return decode_arrays(self.reader.get_many(indices), indices, self.shard, self.property_names)
        except ShardCorruptionError as exc:
            return _damage_item(exc)


class _WdsStreams(IterableDataset):
    """Iterable: DataLoader worker i plays stream (i + rotation) % workers, from its `skip`-th item.
    `location`: where the tars are (a local directory, URL or pipe: template; `sharding.remote`)."""

    def __init__(self, location, plans: list[StreamPlan], position: int, window: int, property_names):
        self.location, self.plans, self.position, self.window = location, plans, position, window
        self.property_names = tuple(property_names)
        self.length = max((p.num_batches for p in plans), default=0)  # items per stream, padded

    def __iter__(self) -> Iterator[dict | None]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        if workers != len(self.plans):
            raise RuntimeError(f"planned {len(self.plans)} streams, running {workers} workers")
        # Item j of the rank's sequence is item j // W of stream j % W; after `position` items the
        # DataLoader restarts at worker 0, so worker i continues stream (i + position) % W.
        stream = (worker + self.position) % workers
        skip = max(0, -(-(self.position - stream) // workers))
        plan = self.plans[stream]
        try:
            yield from stream_batches(self.location, plan, skip, self.window, self.property_names)
        except ShardCorruptionError as exc:
            yield _damage_item(exc)
            return
        for _ in range(max(skip, plan.num_batches), self.length):
            yield None


def stream_batches(location, plan: StreamPlan, skip: int, window: int, property_names) -> Iterator[dict]:
    """Batches `skip`, `skip + 1`, ... of one stream (as `decode_arrays` dicts), reading its tars
    sequentially.

    Records are read in `plan.read_order`; window w (read positions [w * window, (w + 1) * window))
    is emitted in `plan.order`'s permutation of it. Shards wholly before the first needed window are
    never opened.
    """
    if skip >= plan.num_batches:
        return
    start = int(plan.bounds[skip])
    first_window = start // window * window
    values = _read_from(location, plan, first_window)
    pending: dict[int, bytes] = {}
    ready_idx: list[int] = []
    ready_val: list[bytes] = []
    ready_from = first_window  # plan position of ready_*[0]
    b = skip
    for lo in range(first_window, len(plan.order), window):
        hi = min(lo + window, len(plan.order))
        for pos in range(lo, hi):
            index, value, shard = next(values)
            if index != plan.read_order[pos]:
                raise ShardCorruptionError(shard, f"expected key {record_key(int(plan.read_order[pos]))}",
                                           record_key(index))
            check(value, shard, record_key(index))  # here, where the shard is known for the error
            pending[index] = value
        for index in plan.order[lo:hi].tolist():
            ready_idx.append(index)
            ready_val.append(pending.pop(index))
        while b < plan.num_batches and plan.bounds[b + 1] <= hi:
            # Positions before `start` (already consumed before a resume) go with the first batch.
            lo_b, hi_b = int(plan.bounds[b]) - ready_from, int(plan.bounds[b + 1]) - ready_from
            yield decode_arrays(ready_val[lo_b:hi_b], ready_idx[lo_b:hi_b], "webdataset stream",
                                property_names, checked=True)
            del ready_idx[:hi_b], ready_val[:hi_b]
            ready_from += hi_b
            b += 1
        if b == plan.num_batches:
            break
    if hi == len(plan.order) and next(values, None) is not None:
        # That extra read also ran the last shard's end-of-file checks (record count, sha256).
        raise RuntimeError("stream holds more records than planned")


def _read_from(location, plan: StreamPlan, start: int) -> Iterator[tuple[int, bytes, str]]:
    """(index, value, shard) of the stream's records from read position `start` onward.
    Shards wholly before `start` are never opened (nor fetched, for a remote set)."""
    for entry, wanted in zip(plan.shards, plan.shard_indices):
        if start >= len(wanted):
            start -= len(wanted)
            continue
        keep = set(wanted[start:].tolist()) if len(wanted) != entry["num_records"] or start else None
        last = int(wanted[-1])
        start = 0
        records = iter_tar_entry(location, entry)
        for index, value in records:
            if keep is None or index in keep:
                yield index, value, entry["file"]
            if index == last and last != entry["first_index"] + entry["num_records"] - 1:
                # A piece of the shard: the rest belongs to another stream. Closing now ends a
                # download or a pipe: command at once rather than whenever the generator is freed.
                records.close()
                break


# --- the loader --------------------------------------------------------------------------------------
class CrystalLoader:
    """Iterable of CrystalBatch over one split of a shard set; see the module docstring."""

    def __init__(
        self,
        shard_dir: str | Path,
        split: str = "train",
        batch_size: int = 32,
        max_atoms_per_batch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 2048,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        subset: str | Path | None = None,
        property_names: Sequence[str] = (),
        drop_last: bool = False,
        prefetch_factor: int = 2,
        verify_checksums: bool = True,
    ):
        if batch_size < 1 or shuffle_buffer < 1 or max_atoms_per_batch < 0:
            raise ValueError("batch_size and shuffle_buffer must be >= 1, max_atoms_per_batch >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.shards = open_shards(shard_dir)
        self.split = split
        self.batch_size, self.max_atoms = batch_size, max_atoms_per_batch
        self.shuffle, self.window, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.property_names = tuple(property_names)
        self.drop_last = drop_last
        self.subset = None if subset is None else str(subset)
        if verify_checksums and self.shards.format == "lmdb":
            self._verify_lmdb_file()
        self._num_atoms = self.shards.num_atoms(split)  # (n,) uint16; the only per-record state
        self._indices = self._subset_indices(subset)  # (m,) int64, or None for the whole split
        self.epoch = 0
        self.position = 0  # items of this epoch already yielded (incl. WebDataset padding)
        self._plan_cache: tuple[int, object] | None = None

    @classmethod
    def from_config(cls, shard_dir: str | Path, cfg, split: str = "train", **overrides) -> CrystalLoader:
        """From `xtalgen.schema.LoaderConfig` (`cfg.data.loader`); keyword overrides win."""
        options = dict(
            batch_size=cfg.batch_size, max_atoms_per_batch=cfg.max_atoms_per_batch, shuffle=cfg.shuffle,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, num_workers=cfg.num_workers,
            drop_last=cfg.drop_last,
        )
        options.update(overrides)
        return cls(shard_dir, split=split, **options)

    # --- public state --------------------------------------------------------------------------------
    @property
    def manifest_stats(self) -> dict:
        """Prior statistics for the model: num_atoms_histogram {n: count}, mean_density atoms/Å³, ..."""
        return self.shards.stats

    @property
    def num_records(self) -> int:
        """Records of the split (or subset) read per epoch across all ranks."""
        return len(self._num_atoms) if self._indices is None else len(self._indices)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle); a no-op for the current one, so it is safe after resume."""
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (ranks can differ)."""
        plan = self._plan()
        if self.shards.format == "lmdb":
            return len(plan[1]) - 1
        return sum(p.num_batches for p in plan)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position,
                "stream": self._stream_fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if state["stream"] != self._stream_fingerprint():
            diff = {k: (v, self._stream_fingerprint().get(k)) for k, v in state["stream"].items()
                    if self._stream_fingerprint().get(k) != v}
            raise ValueError(f"loader state is for a different stream (saved, now): {diff}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[CrystalBatch]:
        """The rest of the current epoch; at its end the loader moves to the next epoch."""
        items = self._iter_lmdb() if self.shards.format == "lmdb" else self._iter_wds()
        for item in items:
            if item is not None and _DAMAGE in item:
                _raise_damage(item)
            self.position += 1
            if item is not None:
                yield to_batch(item)
        self.epoch, self.position = self.epoch + 1, 0

    # --- internals -----------------------------------------------------------------------------------
    def _stream_fingerprint(self) -> dict:
        """Everything that decides the batch sequence; a resumed loader must match it."""
        fingerprint = {
            "split": self.split, "subset": self.subset, "batch_size": self.batch_size,
            "max_atoms_per_batch": self.max_atoms, "shuffle": self.shuffle, "seed": self.seed,
            "rank": self.rank, "world_size": self.world_size, "drop_last": self.drop_last,
            "num_records": self.num_records, "format": self.shards.format,
        }
        if self.shards.format == "webdataset":
            fingerprint.update(shuffle_buffer=self.window, num_workers=max(self.num_workers, 1))
        return fingerprint

    def _verify_lmdb_file(self) -> None:
        """sha256 of the split's LMDB file against the manifest, once, before anything maps it.

        Per-record crc32 catches altered values, but LMDB trusts its own B-tree pages: an altered
        page can crash the reading process instead of raising. One sequential read (~1 s per GB,
        page cache warm afterwards) rules that out. WebDataset shards are checked as they stream.
        """
        entry = self.shards.shards(self.split)[0]
        path = self.shards.path / entry["file"]
        check_file_size(path, entry)
        if file_sha256(path) != entry["sha256"]:
            raise ShardCorruptionError(entry["file"], "sha256 mismatch (file altered)")

    def _subset_indices(self, subset) -> np.ndarray | None:
        if subset is None:
            return None
        if self.shards.remote:
            raise ValueError(f"subset {subset!r}: subsets are read from a local shard directory, and "
                             f"{self.shards.location} is remote")
        splits = load_subset(self.shards.path, subset)["splits"]
        if self.split not in splits:
            raise ValueError(f"subset {subset!r} has no indices for split {self.split!r} (has {', '.join(splits)})")
        return splits[self.split]["indices"]

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *stream])

    def _plan(self):
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            plan = self._plan_lmdb() if self.shards.format == "lmdb" else self._plan_wds()
            self._plan_cache = (self.epoch, plan)
        return self._plan_cache[1]

    def _plan_lmdb(self) -> tuple[np.ndarray, np.ndarray]:
        indices = np.arange(len(self._num_atoms), dtype=np.int64) if self._indices is None else self._indices
        if self.shuffle:
            indices = self._rng().permutation(indices)
        mine = indices[self.rank :: self.world_size]
        return mine, pack_batches(self._num_atoms[mine], self.batch_size, self.max_atoms, self.drop_last)

    def _plan_wds(self) -> list[StreamPlan]:
        workers = max(self.num_workers, 1)
        streams = self.world_size * workers
        pieces = self._pieces(streams)  # (manifest entry, record indices) to deal out
        order = list(range(len(pieces)))
        if self.shuffle:
            order = self._rng().permutation(order).tolist()
        plans = []
        for worker in range(workers):
            stream = self.rank * workers + worker
            mine = [pieces[i] for i in order[stream::streams]]
            read_order = np.concatenate([ix for _, ix in mine]) if mine else np.zeros(0, np.int64)
            batch_order = read_order
            if self.shuffle and len(read_order):
                # Block shuffle: sort by (window, random key) permutes within each window.
                window_of = np.arange(len(read_order)) // self.window
                batch_order = read_order[np.lexsort((self._rng(stream, 1).random(len(read_order)), window_of))]
            bounds = pack_batches(self._num_atoms[batch_order], self.batch_size, self.max_atoms, self.drop_last)
            plans.append(StreamPlan([e for e, _ in mine], [ix for _, ix in mine], read_order, batch_order, bounds))
        return plans

    def _pieces(self, streams: int) -> list[tuple[dict, np.ndarray]]:
        """Units dealt to streams: whole shards when there are at least as many shards as streams;
        otherwise each shard is cut into contiguous pieces so that no rank or worker sits idle
        (a piece's reader skips the tar's earlier records without decoding them)."""
        shards = [(e, ix) for e in self.shards.shards(self.split) if len(ix := self._shard_indices(e))]
        cuts = -(-streams // len(shards)) if shards else 1
        return [(e, part) for e, ix in shards for part in np.array_split(ix, min(cuts, len(ix)))]

    def _shard_indices(self, entry: dict) -> np.ndarray:
        lo, hi = entry["first_index"], entry["first_index"] + entry["num_records"]
        if self._indices is None:
            return np.arange(lo, hi, dtype=np.int64)
        return self._indices[np.searchsorted(self._indices, lo) : np.searchsorted(self._indices, hi)]

    def _iter_lmdb(self) -> Iterator[dict]:
        order, bounds = self._plan()
        reader = self.shards.lmdb_reader(self.split)
        dataset = _LmdbBatches(reader, reader.name, order, bounds, self.property_names)
        remaining = range(self.position, len(dataset))
        if self.num_workers == 0:
            return (dataset[b] for b in remaining)
        return iter(DataLoader(dataset, batch_size=None, sampler=remaining, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor, collate_fn=_keep_arrays))

    def _iter_wds(self) -> Iterator[dict | None]:
        dataset = _WdsStreams(self.shards.location, self._plan(), self.position, self.window, self.property_names)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               prefetch_factor=self.prefetch_factor, collate_fn=_keep_arrays))
