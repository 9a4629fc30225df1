"""WebDataset shards: tar files `DIR/wds/<split>-000000.tar` of `records_per_shard` records each.

Each sample is one tar member `<key>.msgpack` with `__key__` the zero-padded global record index
and the value a sealed `encode_record` msgpack map (see `codec`), so shard `i` of a split holds
indices `[i * records_per_shard, (i + 1) * records_per_shard)`. Written with `webdataset.TarWriter`
with a fixed mtime, owner and mode, so the same records give byte-identical tars. Read back
sequentially by `iter_tar_shard` (see there why by hand); no pickle anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from xtalgen.diskspace import from_os_error, is_out_of_space
from xtalgen.sharding.codec import ShardCorruptionError, record_key

SAMPLE_EXTENSION = "msgpack"
_READ_CHUNK = 1 << 20


def shard_file_name(split: str, shard_index: int) -> str:
    return f"{split}-{shard_index:06d}.tar"


class WdsSplitWriter:
    """Writes one split as consecutive tar shards under temporary names; `close()` lists them."""

    def __init__(self, directory: Path, split: str, records_per_shard: int):
        if records_per_shard < 1:
            raise ValueError("records_per_shard must be >= 1")
        self.directory = directory
        self.split = split
        self.records_per_shard = records_per_shard
        self.count = 0
        self._shards: list[tuple[Path, str, int]] = []  # (temporary path, final file name, records)
        self._tar = None  # webdataset.TarWriter of the open shard
        self._in_shard = 0

    def add(self, value: bytes) -> None:
        with self._no_space_named():
            if self._tar is None:
                self._open_next()
            self._tar.write({"__key__": record_key(self.count), SAMPLE_EXTENSION: value})
            self.count += 1
            self._in_shard += 1
            if self._in_shard == self.records_per_shard:
                self._close_current()

    def close(self) -> list[tuple[Path, str, int]]:
        with self._no_space_named():
            self._close_current()
        return list(self._shards)

    def abort(self) -> None:
        """Close and remove every temporary shard (after a failed write)."""
        if self._tar is not None:
            # Close the tar stream before its file: a stream left open flushes its buffer when it is
            # garbage-collected, into a closed file ("Exception ignored ... write to closed file").
            # Both flushes fail again on a full disk; the stream counts as closed all the same.
            with contextlib.suppress(OSError, ValueError):
                self._tar.close()
            with contextlib.suppress(OSError):
                self._file.close()
            self._tar = None
        for tmp, _, _ in self._shards:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _no_space_named(self):
        """A full disk as DiskFullError naming the shard: an OSError from a file object names no file."""
        try:
            yield
        except OSError as exc:
            if not is_out_of_space(exc):
                raise
            raise from_os_error(exc, self._shards[-1][0] if self._shards else self.directory) from None

    def _open_next(self) -> None:
        name = shard_file_name(self.split, len(self._shards))
        tmp = self.directory / f"{name}.tmp"
        from webdataset import TarWriter  # imported on use: `import webdataset` pulls in torch (seconds)

        self._file = open(tmp, "wb")
        # Fixed mtime/owner/mode: the tar bytes then depend only on the records. The mtime must be an
        # int: tarfile adds a PAX header to every member whose mtime is a float.
        self._tar = TarWriter(self._file, user="xtalgen", group="xtalgen", mode=0o444, encoder=False, mtime=0)
        self._shards.append((tmp, name, 0))
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        tmp, name, _ = self._shards[-1]
        self._shards[-1] = (tmp, name, self._in_shard)
        self._tar = None


_BLOCK = 512
_END_OF_ARCHIVE = bytes(_BLOCK)
_REGULAR_FILE = (b"0", b"\0")


def _after(index: int, first_index: int) -> str:
    """Where in a shard, for error messages: after the last good key (built only on error)."""
    return f"after key {record_key(index - 1)}" if index > first_index else "at its start"


def _parse_header(header: bytes) -> tuple[str, int]:
    """(member name, data size) of one ustar header; ValueError if damaged or not a plain file."""
    stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
    size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    # The checksum is the byte sum of the header with its own 8-byte field read as spaces.
    if stored != sum(header) - sum(header[148:156]) + 8 * 32:
        raise ValueError("checksum mismatch")
    if header[156:157] not in _REGULAR_FILE:
        raise ValueError(f"unsupported member type {header[156:157]!r}")
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), size


def iter_tar_shard(
    path: Path, name: str, first_index: int, num_records: int, sha256: str | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield (record index, sealed value) of one local tar shard in order; see `iter_tar_stream`.
    A missing file raises ShardCorruptionError naming the shard."""
    if not path.exists():
        raise ShardCorruptionError(name, "shard file is missing")
    with open(path, "rb", buffering=_READ_CHUNK) as f:
        yield from iter_tar_stream(f, name, first_index, num_records, sha256)


def iter_tar_entry(location, entry: dict) -> Iterator[tuple[int, bytes]]:
    """The records of the shard a manifest `entry` names, from a local directory, a URL or a
    `pipe:` command (`xtalgen.sharding.remote`), checked against the entry (keys, count, sha256)."""
    with location.open(entry["file"]) as f:
        yield from iter_tar_stream(f, entry["file"], entry["first_index"], entry["num_records"], entry["sha256"])


def iter_tar_stream(
    f: BinaryIO, name: str, first_index: int, num_records: int, sha256: str | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield (record index, sealed value) of one tar shard read sequentially from the binary
    stream `f` (`read(n)` returns n bytes unless the stream ended), checking what the manifest says.

    Raises ShardCorruptionError naming the shard (and the last good key) for a damaged or
    truncated tar, unexpected keys, a wrong record count, or (when `sha256` is given and the shard
    was read to its end) a checksum mismatch. A stream is never rewound, so the same checks hold
    for a local file, an HTTP response and a command's output.

    Why not webdataset's tar iterator: it goes through `tarfile`, ~100-200 µs per member in Python,
    which caps a process far below the 20k structures/s a training stream needs. The shards are
    plain ustar files written by `WdsSplitWriter` (one regular file per record), so reading them is
    a fixed 512-byte header walk; any tar tool, and `webdataset.WebDataset`, reads them as well.
    """
    digest = hashlib.sha256()
    expected = first_index
    while True:
        header = f.read(_BLOCK)
        digest.update(header)
        if header == _END_OF_ARCHIVE:
            break
        if len(header) < _BLOCK:
            where = _after(expected, first_index)
            raise ShardCorruptionError(name, f"truncated {where} (no end-of-archive marker)")
        try:
            member, size = _parse_header(header)
        except ValueError as exc:
            where = _after(expected, first_index)
            raise ShardCorruptionError(name, f"damaged tar header {where}: {exc}") from None
        padded = -(-size // _BLOCK) * _BLOCK
        block = f.read(padded)
        digest.update(block)
        if len(block) < padded:
            raise ShardCorruptionError(name, f"truncated inside member {member!r}", key=member.partition(".")[0])
        key, _, ext = member.partition(".")
        if key != record_key(expected) or ext != SAMPLE_EXTENSION:
            where = _after(expected, first_index)
            raise ShardCorruptionError(name, f"unexpected member {member!r} {where}")
        yield expected, block[:size]
        expected += 1
    if expected - first_index != num_records:
        raise ShardCorruptionError(
            name, f"holds {expected - first_index} records, manifest says {num_records} (truncated?)"
        )
    while chunk := f.read(_READ_CHUNK):  # the rest of the end-of-archive padding
        digest.update(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ShardCorruptionError(name, "sha256 mismatch (file altered)")
