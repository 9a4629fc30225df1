"""WebDataset shards: tar files `DIR/wds/<split>-000000.tar` of `records_per_shard` records each.

Each sample is one tar member `<key>.msgpack` with `__key__` the zero-padded global record index
and the value a sealed `encode_record` msgpack map (see `codec`), so shard `i` of a split holds
indices `[i * records_per_shard, (i + 1) * records_per_shard)`. Written with `webdataset.TarWriter`
with a fixed mtime, owner and mode, so the same records give byte-identical tars. Read back with
webdataset's streaming tar iterator: sequential, works on any file system, no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path

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
        if self._tar is None:
            self._open_next()
        self._tar.write({"__key__": record_key(self.count), SAMPLE_EXTENSION: value})
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.records_per_shard:
            self._close_current()

    def close(self) -> list[tuple[Path, str, int]]:
        self._close_current()
        return list(self._shards)

    def _open_next(self) -> None:
        name = shard_file_name(self.split, len(self._shards))
        tmp = self.directory / f"{name}.tmp"
        from webdataset import TarWriter  # imported on use: `import webdataset` pulls in torch (seconds)

        self._file = open(tmp, "wb")
        # Fixed mtime/owner/mode: the tar bytes then depend only on the records.
        self._tar = TarWriter(self._file, user="xtalgen", group="xtalgen", mode=0o444, encoder=False, mtime=0.0)
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


class _HashingReader:
    """File wrapper that hashes every byte read, so a streamed shard is checked against its sha256."""

    def __init__(self, fileobj):
        self._f = fileobj
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(_READ_CHUNK):
            pass


def iter_tar_shard(
    path: Path, name: str, first_index: int, num_records: int, sha256: str | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield (record index, sealed value) of one tar shard in order, checking what the manifest says.

    Raises ShardCorruptionError naming the shard (and the last good key) for a missing file, a
    damaged or truncated tar, unexpected keys, a wrong record count, or (when `sha256` is given and
    the shard was read to its end) a checksum mismatch.
    """
    from webdataset.tariterators import tar_file_iterator  # imported on use, see WdsSplitWriter

    if not path.exists():
        raise ShardCorruptionError(name, "shard file is missing")
    expected = first_index
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        samples = tar_file_iterator(reader)
        while True:
            last_key = record_key(expected - 1) if expected > first_index else None
            try:
                sample = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ShardCorruptionError(name, f"damaged tar after key {last_key}: {exc}") from exc
            key, _, ext = sample["fname"].partition(".")
            if key != record_key(expected) or ext != SAMPLE_EXTENSION:
                raise ShardCorruptionError(name, f"unexpected member {sample['fname']!r} after key {last_key}")
            yield expected, sample["data"]
            expected += 1
        if expected - first_index != num_records:
            raise ShardCorruptionError(
                name, f"holds {expected - first_index} records, manifest says {num_records} (truncated?)"
            )
        reader.drain()
        if sha256 is not None and reader.sha256.hexdigest() != sha256:
            raise ShardCorruptionError(name, "sha256 mismatch (file altered)")
