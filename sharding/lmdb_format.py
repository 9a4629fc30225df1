"""LMDB shards: one single-file environment per split, `DIR/lmdb/<split>.lmdb`.

Keys are zero-padded record indices (`000000042`), values sealed `encode_record` msgpack (see
`codec`). Random access makes LMDB the format for map-style loading on one node.

Same bytes for the same input: records are inserted in index order with MDB_APPEND, committed
every `COMMIT_EVERY` records, into an environment with a fixed map size; LMDB zero-fills fresh
pages, so two builds of the same records give byte-identical files (a test checks this). No lock
file is used: one writer owns the temporary file, readers open read-only without locking.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import lmdb

from xtalgen.diskspace import NO_SPACE_ERRNOS, DiskFullError
from xtalgen.sharding.codec import ShardCorruptionError, record_key

# Virtual address space only (the file grows with the data, it is not preallocated); fixed so the
# meta pages, which record it, are the same for every build.
MAP_SIZE = 1 << 40
COMMIT_EVERY = 8192


# py-lmdb refuses to open one file twice in a process, so read-only environments are shared by
# every reader of that file in this process: keyed by pid (never reuse across fork) and inode
# (a rebuilt file is a new inode and gets a new environment). They stay open while the process lives.
_SHARED: dict[tuple[int, int, int], lmdb.Environment] = {}


def _shared_readonly_env(path: Path) -> lmdb.Environment:
    st = path.stat()
    key = (os.getpid(), st.st_dev, st.st_ino)
    if key not in _SHARED:
        for stale in [k for k in _SHARED if k[0] != key[0]]:
            # Inherited through fork (a DataLoader worker): py-lmdb would refuse to reopen the file
            # while this copy is open. Closing it unmaps only this process's copy; without a lock
            # file there is no shared state, so the parent's environment is untouched.
            _SHARED.pop(stale).close()
        _SHARED[key] = _open_env(path, readonly=True)
    return _SHARED[key]


def _open_env(path: Path, readonly: bool) -> lmdb.Environment:
    return lmdb.open(
        str(path),
        subdir=False,
        readonly=readonly,
        lock=False,
        map_size=MAP_SIZE,
        readahead=False,  # random access: do not drag neighbouring pages into the page cache
        meminit=True,
        max_dbs=0,
    )


class LmdbSplitWriter:
    """Writes one split's records, in index order, to a temporary file; `close()` returns it."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        for stale in (tmp_path, Path(f"{tmp_path}-lock")):
            stale.unlink(missing_ok=True)
        self._env = _open_env(tmp_path, readonly=False)
        self._txn = self._env.begin(write=True)
        self.count = 0

    def add(self, value: bytes) -> None:
        try:
            if not self._txn.put(record_key(self.count).encode(), value, append=True):
                raise RuntimeError(f"{self.tmp_path}: key {self.count} already present")
            self.count += 1
            if self.count % COMMIT_EVERY == 0:
                self._txn.commit()
                self._txn = self._env.begin(write=True)
        except lmdb.Error as exc:
            raise _write_failure(exc, self.tmp_path) from None

    def close(self) -> Path:
        try:
            self._txn.commit()
            self._env.sync(True)
        except lmdb.Error as exc:
            raise _write_failure(exc, self.tmp_path) from None
        self._env.close()
        return self.tmp_path

    def abort(self) -> None:
        """Drop the uncommitted records and remove the temporary file (after a failed write)."""
        with contextlib.suppress(lmdb.Error):
            self._txn.abort()
        with contextlib.suppress(lmdb.Error):
            self._env.close()
        self.tmp_path.unlink(missing_ok=True)


# LMDB passes the C library's strerror through: these are its words for a full disk, a quota, a
# file-size limit, and (EIO) a write cut short, which is how a full disk usually reaches it.
_NO_SPACE_WORDS = tuple(os.strerror(e) for e in (*NO_SPACE_ERRNOS, errno.EIO))


def _write_failure(exc: lmdb.Error, path: Path) -> Exception:
    """The DiskFullError an LMDB write error stands for; any other LMDB error is returned as it is."""
    text = str(exc)
    if isinstance(exc, lmdb.MapFullError):
        return DiskFullError(path, f"{text} (the LMDB map size, {MAP_SIZE >> 30} GiB, is used up)")
    if not any(word in text for word in _NO_SPACE_WORDS):
        return exc
    if os.strerror(errno.EIO) in text:
        text += " (LMDB's report of a write cut short: a full disk, a quota or a file-size limit)"
    return DiskFullError(path, text)


_KEY_LENGTH = len(record_key(0))


def _checked_key(raw: bytes, shard: str, previous: str | None) -> str:
    """`raw` as a record key, or ShardCorruptionError: LMDB returns whatever bytes a damaged leaf
    page holds, and those must not surface as a decoding error that names no shard."""
    if len(raw) != _KEY_LENGTH or not raw.isdigit():  # bytes.isdigit: ASCII 0-9 only
        where = f"after key {previous}" if previous is not None else "at its start"
        raise ShardCorruptionError(shard, f"damaged record key {raw[:32]!r} {where}")
    return raw.decode("ascii")


class LmdbSplitReader:
    """Random access to one split's LMDB file; opens lazily so it survives fork into workers."""

    def __init__(self, path: Path, name: str, num_records: int):
        self.path = path
        self.name = name  # shard name used in error messages (relative to the shard set)
        self.num_records = num_records
        self._env: lmdb.Environment | None = None
        self._pid = -1

    def _environment(self) -> lmdb.Environment:
        if self._env is None or self._pid != os.getpid():  # LMDB handles must not cross fork
            if not self.path.exists():
                raise ShardCorruptionError(self.name, "shard file is missing")
            try:
                self._env = _shared_readonly_env(self.path)
            except lmdb.Error as exc:
                raise ShardCorruptionError(self.name, f"cannot open LMDB file: {exc}") from exc
            self._pid = os.getpid()
        return self._env

    def get_many(self, indices: Sequence[int]) -> list[bytes]:
        """Values of the given record indices, in that order."""
        out = []
        try:
            with self._environment().begin(buffers=False) as txn:
                for i in indices:
                    key = record_key(int(i))
                    value = txn.get(key.encode())
                    if value is None:
                        raise ShardCorruptionError(self.name, "record is missing", key)
                    out.append(value)
        except lmdb.Error as exc:
            raise ShardCorruptionError(self.name, f"LMDB error: {exc}") from exc
        return out

    def iter_items(self) -> Iterator[tuple[str, bytes]]:
        """(key, value) in key order, streaming with a cursor. A key that is not a record key (an
        altered byte in a leaf page) raises ShardCorruptionError naming the shard and the last good key."""
        previous = None
        try:
            with self._environment().begin(buffers=False) as txn:
                for raw, value in txn.cursor():
                    previous = _checked_key(raw, self.name, previous)
                    yield previous, value
        except lmdb.Error as exc:
            raise ShardCorruptionError(self.name, f"LMDB error: {exc}") from exc

    def close(self) -> None:
        self._env = None  # the environment is shared; it closes when nothing references it

    def __getstate__(self) -> dict:
        # An open environment is not transferable to another process; reopen there.
        return {**self.__dict__, "_env": None, "_pid": -1}
