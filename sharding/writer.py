"""`ShardSetWriter`: records in, a complete shard set (shards + index + manifest) out.

Usage (what `xtalgen.datasets.build.build_shards` does)::

    writer = ShardSetWriter(out_dir, fmt="lmdb", records_per_shard=20000)
    for split, record in records_in_global_order:
        writer.add(split, record)
    manifest = writer.finalize(sources=[...], rejected={"atoms_too_close": 3}, config={...})

Layout of `out_dir`::

    manifest.json                     written last: its presence means the set is complete
    lmdb/<split>.lmdb                 (fmt="lmdb") one LMDB file per split
    wds/<split>-000000.tar ...        (fmt="webdataset") tar shards of records_per_shard records
    index/<split>.num_atoms.npy       atoms per record (uint16): atom-budget batching plans and
                                      resume without reading the records

Everything is written under `*.tmp` names and renamed by `finalize`, after the old manifest has
been removed and before the new one is written; a crash at any point never leaves a set that
looks complete but is not.

The writer holds the directory's lock (`xtalgen.dirlock`) from construction to `finalize` or
`abort`: a second writer into the same directory is refused before it touches anything, since the
`*.tmp` names are the same for every build and each build clears the ones it finds. A full disk
(`xtalgen.diskspace.DiskFullError`, naming the file) aborts the set: its temporary files are
removed, so the space they held is free again and nothing half-written stays behind.
"""

from __future__ import annotations

import dataclasses
import os
import re
from array import array
from pathlib import Path

import numpy as np

from xtalgen.dirlock import DirectoryLock
from xtalgen.diskspace import DiskFullError, from_os_error, is_out_of_space
from xtalgen.record import CrystalRecord, encode_record
from xtalgen.sharding.codec import seal
from xtalgen.sharding.lmdb_format import LmdbSplitWriter
from xtalgen.sharding.manifest import (
    MANIFEST_NAME,
    PRIOR_SPLIT,
    SCHEMA_VERSION,
    SplitStats,
    created_by,
    file_sha256,
    merge_stats,
    write_manifest,
)
from xtalgen.sharding.webdataset_format import WdsSplitWriter

FORMATS = ("lmdb", "webdataset")
FORMAT_DIRS = {"lmdb": "lmdb", "webdataset": "wds"}
INDEX_DIR = "index"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
MAX_ATOMS_PER_RECORD = 65535  # the atom-count index is uint16


def num_atoms_index_name(split: str) -> str:
    return f"{INDEX_DIR}/{split}.num_atoms.npy"


class ShardSetWriter:
    """Writes records of any number of splits into one shard set; see the module docstring."""

    def __init__(self, out_dir: str | Path, fmt: str = "lmdb", records_per_shard: int = 20000):
        if fmt not in FORMATS:
            raise ValueError(f"unknown shard format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if records_per_shard < 1:
            raise ValueError("records_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.records_per_shard = records_per_shard
        self._format_dir = self.out_dir / FORMAT_DIRS[fmt]
        self._index_dir = self.out_dir / INDEX_DIR
        self._lock = DirectoryLock(self.out_dir).acquire()  # before the stale *.tmp files are cleared
        for folder in (self._format_dir, self._index_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.tmp"):  # left by an interrupted earlier build
                stale.unlink()
        self._writers: dict[str, LmdbSplitWriter | WdsSplitWriter] = {}
        self._stats: dict[str, SplitStats] = {}
        self._num_atoms: dict[str, array] = {}
        self._finalized = False

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finalized:  # left by an error: no manifest, and nothing temporary stays behind
            self.abort()

    def add(self, split: str, record: CrystalRecord) -> None:
        """Append `record` to `split`; its index there is the number of records added before it."""
        if self._finalized:
            raise RuntimeError("ShardSetWriter.add after finalize")
        if record.num_atoms > MAX_ATOMS_PER_RECORD:
            raise ValueError(f"record {record.id!r}: {record.num_atoms} atoms; shards hold at most "
                             f"{MAX_ATOMS_PER_RECORD} per structure")
        writer = self._writers.get(split) or self._open_split(split)
        try:
            writer.add(seal(encode_record(record)))
        except DiskFullError as exc:
            raise self._stopped(exc) from None
        self._stats[split].add(record)
        self._num_atoms[split].append(record.num_atoms)

    def finalize(
        self, sources: list[dict] | None = None, rejected: dict[str, int] | None = None, config=None
    ) -> dict:
        """Close every shard, rename into place, write and return `manifest.json`."""
        if self._finalized:
            raise RuntimeError("ShardSetWriter.finalize called twice")
        self._finalized = True
        try:
            try:
                pending = self._close_all()  # (temporary path, final relative name, first index, records)
            except DiskFullError as exc:
                raise self._stopped(exc) from None
            (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
            self._remove_stale_outputs({name for _, name, _, _ in pending})
            for tmp, name, _, _ in pending:
                os.replace(tmp, self.out_dir / name)
            manifest = self._manifest(pending, sources or [], rejected or {}, config)
            try:
                write_manifest(self.out_dir, manifest)
            except OSError as exc:
                if not is_out_of_space(exc):
                    raise
                # The shards are in place but without a manifest the set is incomplete: a rerun builds it.
                written = sum((self.out_dir / name).stat().st_size for _, name, _, _ in pending)
                raise from_os_error(exc, self.out_dir / MANIFEST_NAME).with_estimate(written, None) from None
        finally:
            self._lock.release()
        return manifest

    def abort(self) -> None:
        """Stop without a manifest: close every shard, remove the temporary files, release the lock."""
        self._finalized = True
        for writer in self._writers.values():
            writer.abort()
        for path in self._index_dir.glob("*.npy.tmp"):
            path.unlink(missing_ok=True)
        self._lock.release()

    # --- internals ---------------------------------------------------------------------------------
    def _open_split(self, split: str) -> LmdbSplitWriter | WdsSplitWriter:
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split name {split!r} must be letters, digits or underscores")
        if self.fmt == "lmdb":
            writer = LmdbSplitWriter(self._format_dir / f"{split}.lmdb.tmp")
        else:
            writer = WdsSplitWriter(self._format_dir, split, self.records_per_shard)
        self._writers[split] = writer
        self._stats[split] = SplitStats()
        self._num_atoms[split] = array("H")
        return writer

    def _close_all(self) -> list[tuple[Path, str, int, int]]:
        pending = []
        fmt_dir = FORMAT_DIRS[self.fmt]
        for split in sorted(self._writers):
            writer = self._writers[split]
            if isinstance(writer, LmdbSplitWriter):
                pending.append((writer.close(), f"{fmt_dir}/{split}.lmdb", 0, writer.count))
            else:
                first = 0
                for tmp, name, count in writer.close():
                    pending.append((tmp, f"{fmt_dir}/{name}", first, count))
                    first += count
            index_tmp = self._index_dir / f"{split}.num_atoms.npy.tmp"
            try:
                with open(index_tmp, "wb") as f:
                    np.save(f, np.frombuffer(self._num_atoms[split], dtype=np.uint16), allow_pickle=False)
            except OSError as exc:
                if not is_out_of_space(exc):
                    raise
                raise from_os_error(exc, index_tmp) from None
            pending.append((index_tmp, num_atoms_index_name(split), 0, writer.count))
        return pending

    def _stopped(self, exc: DiskFullError) -> DiskFullError:
        """`exc` with what this set had written, after aborting it (which frees that space)."""
        written = sum(p.stat().st_size for folder in (self._format_dir, self._index_dir)
                      for p in folder.glob("*.tmp") if p.is_file())
        self.abort()
        return exc.with_estimate(written, exc.needed, exc.at_least)

    def _remove_stale_outputs(self, keep: set[str]) -> None:
        """Shards of an earlier build of this directory that the new set does not overwrite."""
        for folder in (self._format_dir, self._index_dir):
            for path in folder.iterdir():
                if path.suffix == ".tmp" or not path.is_file():  # ours, about to be renamed
                    continue
                if path.relative_to(self.out_dir).as_posix() not in keep:
                    path.unlink()

    def _manifest(self, pending, sources: list[dict], rejected: dict[str, int], config) -> dict:
        splits: dict[str, dict] = {split: {"shards": []} for split in self._writers}
        for _, name, first, count in pending:
            split = _split_of(name)
            entry = {
                "file": name,
                "first_index": first,
                "num_records": count,
                "bytes": (self.out_dir / name).stat().st_size,
                "sha256": file_sha256(self.out_dir / name),
            }
            if name.startswith(INDEX_DIR + "/"):
                splits[split]["num_atoms_index"] = entry
            else:
                splits[split]["shards"].append(entry)
        split_stats = {split: self._stats[split].to_dict() for split in self._writers}
        for split, entry in splits.items():
            entry["num_records"] = split_stats[split]["num_records"]
            entry["stats"] = split_stats[split]
        if PRIOR_SPLIT in split_stats:
            prior = {"split": PRIOR_SPLIT, **split_stats[PRIOR_SPLIT]}
        else:  # no train split (e.g. an evaluation reference set): priors over everything
            prior = {"split": None, **merge_stats(list(split_stats.values()))}
        coverage = merge_stats(list(split_stats.values()))["property_coverage"] if split_stats else {}
        return {
            "schema_version": SCHEMA_VERSION,
            "created_by": created_by(),
            "format": self.fmt,
            "record_encoding": "xtalgen.record.encode_record msgpack map + crc32 entry",
            "records_per_shard": self.records_per_shard if self.fmt == "webdataset" else None,
            "num_records": sum(s["num_records"] for s in split_stats.values()),
            "splits": splits,
            "stats": prior,
            "property_coverage": coverage,
            "sources": [{k: str(v) if isinstance(v, Path) else v for k, v in s.items()} for s in sources],
            "rejected": {k: int(rejected[k]) for k in sorted(rejected)},
            "config": _plain(config),
        }


def _split_of(name: str) -> str:
    """Split of a shard's relative file name (`lmdb/train.lmdb`, `wds/train-000001.tar`, `index/...`)."""
    base = name.split("/", 1)[1]
    if base.endswith(".tar"):
        return base.rsplit("-", 1)[0]
    return base.split(".", 1)[0]


def _plain(config):
    """The data config as plain JSON types (accepts a dict, a dataclass or an OmegaConf node)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(config, DictConfig):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(config)
