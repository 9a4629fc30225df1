"""`open_shards(path) -> ShardSet`: one reading interface over LMDB and WebDataset shard sets.

    shards = open_shards("shards/perov")
    shards.format, shards.splits, shards.num_records("train")
    shards.stats                      # prior statistics: num_atoms_histogram {n: count}, mean_density
    for record in shards.iter_records("train"): ...
    shards.get_records("val", [0, 5, 9])
    open_shards("https://host/shards/mp20")   # WebDataset sets also stream from URLs and pipe: commands

Every read checks what it reads: each value's crc32 (any altered byte), LMDB file sizes against
the manifest (truncation), tar structure, keys, counts and sha256 per shard. Problems raise
`ShardCorruptionError` naming the shard and, when known, the key.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from xtalgen.record import CrystalRecord
from xtalgen.sharding.codec import ShardCorruptionError, record_key, unseal_record
from xtalgen.sharding.lmdb_format import LmdbSplitReader
from xtalgen.sharding.manifest import MANIFEST_NAME, manifest_hash, parse_manifest, prior_stats, read_manifest
from xtalgen.sharding.remote import read_remote_file, shard_location
from xtalgen.sharding.webdataset_format import iter_tar_entry


class ShardSet:
    """A built shard set: its manifest plus readers for each split (see module docstring).

    `location`: where the files are (`xtalgen.sharding.remote`); `path` is the local directory, or
    None for a set behind a URL or a `pipe:` command, which only WebDataset sets can be.
    """

    def __init__(self, path: str | Path):
        self.location = shard_location(path)
        self.remote: bool = self.location.remote
        self.path: Path | None = None if self.remote else self.location.path
        self._manifest_sha256: str | None = None
        if self.remote:
            raw = self.location.read_bytes(MANIFEST_NAME)
            self.manifest: dict = parse_manifest(raw, self.location.describe(MANIFEST_NAME))
            self._manifest_sha256 = hashlib.sha256(raw).hexdigest()
        else:
            self.manifest = read_manifest(self.path)
        self.format: str = self.manifest["format"]
        if self.remote and self.format != "webdataset":
            raise ValueError(
                f"{self.location} holds {self.format} shards, which are read by random access from a local "
                "file: only webdataset shards stream from a URL or a pipe: command (copy the set to a local "
                "or shared file system, or build it with --format webdataset)"
            )
        self._lmdb: dict[str, LmdbSplitReader] = {}

    # --- what the set holds ------------------------------------------------------------------------
    @property
    def manifest_sha256(self) -> str:
        """sha256 of `manifest.json`: identifies the set (a remote one by the bytes fetched)."""
        return self._manifest_sha256 or manifest_hash(self.path)

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def num_records(self, split: str) -> int:
        return int(self._split(split)["num_records"])

    @property
    def stats(self) -> dict:
        """Prior statistics (train split): num_atoms_histogram {n: count}, mean_density atoms/Å³,
        element_counts {Z: atoms}, property_coverage {name: records}, num_records."""
        return prior_stats(self.manifest)

    def split_stats(self, split: str) -> dict:
        return prior_stats({"stats": {"split": split, **self._split(split)["stats"]}})

    def shards(self, split: str) -> list[dict]:
        """Manifest entries of the split's shard files: file, first_index, num_records, bytes, sha256."""
        return list(self._split(split)["shards"])

    def num_atoms(self, split: str) -> np.ndarray:
        """(num_records,) uint16 atoms per record, from the index written beside the shards."""
        entry = self._split(split)["num_atoms_index"]
        if self.remote:
            source = io.BytesIO(read_remote_file(self.location, entry["file"], entry["sha256"]))
        else:
            source = self.path / entry["file"]
            if not source.exists():
                raise ShardCorruptionError(entry["file"], "index file is missing")
        try:
            counts = np.load(source, allow_pickle=False)
        except ValueError as exc:
            raise ShardCorruptionError(entry["file"], f"unreadable index: {exc}") from exc
        if counts.shape != (self.num_records(split),):
            raise ShardCorruptionError(entry["file"], f"index has shape {counts.shape}, expected one per record")
        return counts

    # --- reading -------------------------------------------------------------------------------------
    def iter_values(self, split: str, shard_ids: Iterable[int] | None = None) -> Iterator[tuple[int, bytes, str]]:
        """(record index, sealed value, shard name) in index order, over all or the given shards."""
        shards = self.shards(split)
        for i in range(len(shards)) if shard_ids is None else shard_ids:
            entry = shards[i]
            if self.format == "lmdb":
                for key, value in self._lmdb_reader(split).iter_items():
                    yield int(key), value, entry["file"]
            else:
                for index, value in iter_tar_entry(self.location, entry):
                    yield index, value, entry["file"]

    def iter_records(self, split: str) -> Iterator[CrystalRecord]:
        """Every record of a split in index order (streaming: memory stays flat)."""
        for index, value, shard in self.iter_values(split):
            yield unseal_record(value, shard, record_key(index))

    def get_values(self, split: str, indices: Sequence[int]) -> list[bytes]:
        """Sealed values at `indices` (in that order). Random access on LMDB; on WebDataset the
        shards holding them are streamed, which is fine for a few records, slow for many."""
        if self.format == "lmdb":
            return self._lmdb_reader(split).get_many(indices)
        wanted = {int(i) for i in indices}
        rps = self.manifest["records_per_shard"]
        found: dict[int, bytes] = {}
        for index, value, _ in self.iter_values(split, sorted({i // rps for i in wanted})):
            if index in wanted:
                found[index] = value
        return [found[int(i)] for i in indices]

    def get_records(self, split: str, indices: Sequence[int]) -> list[CrystalRecord]:
        values = self.get_values(split, indices)
        return [unseal_record(v, self.shard_of(split, int(i)), record_key(int(i))) for i, v in zip(indices, values)]

    def shard_of(self, split: str, index: int) -> str:
        """File name (relative to the set) of the shard holding record `index` of `split`."""
        shards = self.shards(split)
        if self.format == "lmdb":
            return shards[0]["file"]
        return shards[index // self.manifest["records_per_shard"]]["file"]

    def lmdb_reader(self, split: str) -> LmdbSplitReader:
        """The random-access reader of an LMDB split (map-style loaders use it directly)."""
        if self.format != "lmdb":
            raise ValueError(f"{self.path} holds {self.format} shards; random access needs lmdb")
        return self._lmdb_reader(split)

    def close(self) -> None:
        for reader in self._lmdb.values():
            reader.close()
        self._lmdb.clear()

    # --- internals -----------------------------------------------------------------------------------
    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise KeyError(f"{self.path} has no split {split!r}; it has {', '.join(self.splits)}") from None

    def _lmdb_reader(self, split: str) -> LmdbSplitReader:
        if split not in self._lmdb:
            entry = self.shards(split)[0]
            path = self.path / entry["file"]
            check_file_size(path, entry)
            self._lmdb[split] = LmdbSplitReader(path, entry["file"], entry["num_records"])
        return self._lmdb[split]

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.num_records(s)}" for s in self.splits)
        return f"ShardSet({str(self.location)!r}, format={self.format!r}, {counts})"


def check_file_size(path: Path, entry: dict) -> None:
    """Missing or resized shard file -> ShardCorruptionError. For LMDB this also guards against
    the crash (SIGBUS) that reading a memory-mapped truncated file would cause."""
    if not path.exists():
        raise ShardCorruptionError(entry["file"], "shard file is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardCorruptionError(entry["file"], f"size {size} bytes, manifest says {entry['bytes']} (truncated?)")


def open_shards(path: str | Path) -> ShardSet:
    """Open a shard set directory (or its manifest.json)."""
    return ShardSet(path)
