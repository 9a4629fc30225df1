"""Stored record values: `encode_record` msgpack plus a CRC-32, and the errors raised on damage.

A shard value is still one plain msgpack map that `xtalgen.record.decode_record` reads unchanged:
sealing appends a `crc32` entry to the map `encode_record` produced. The CRC covers every byte of
the value before the 4 CRC bytes (map header included), so any flipped byte in an LMDB value or a
tar member is caught when the record is read and reported with its shard and key, instead of
surfacing as wrong coordinates or a random msgpack exception. Whole-file damage (truncation,
a flipped byte in LMDB's own pages or a tar header) is caught by the per-shard sha256 in the
manifest (`xtalgen shard verify`) and by the format readers.

Why by hand: msgpack has no "append to an encoded map" API, and re-encoding the whole record
just to add one key would double the write cost. The layout touched here is two fixed bytes.
"""

from __future__ import annotations

import zlib

import msgpack

from xtalgen.record import CrystalRecord, decode_record

# msgpack fixmap headers are 0x80 | n_entries (n <= 15); the trailer is the key "crc32" (fixstr)
# followed by a uint32 marker and the CRC in big-endian, as msgpack encodes a uint32.
_FIXMAP_FIRST, _FIXMAP_LAST = 0x80, 0x8F
_TRAILER_PREFIX = b"\xa5crc32\xce"
_TRAILER_LEN = len(_TRAILER_PREFIX) + 4


class ShardCorruptionError(RuntimeError):
    """A shard file is missing, truncated or altered. Names the shard (and the key when known)."""

    def __init__(self, shard: str, detail: str, key: str | None = None):
        self.shard = shard
        self.key = key
        self.detail = detail
        where = f"shard {shard}" + (f", key {key}" if key is not None else "")
        super().__init__(f"corrupt data in {where}: {detail}")


def seal(encoded: bytes) -> bytes:
    """Append a `crc32` entry to the msgpack map from `encode_record`."""
    header = encoded[0]
    if not _FIXMAP_FIRST <= header < _FIXMAP_LAST:
        raise ValueError("seal expects a msgpack fixmap with fewer than 15 entries")
    body = bytes([header + 1]) + encoded[1:] + _TRAILER_PREFIX
    return body + zlib.crc32(body).to_bytes(4, "big")


def check(value: bytes | memoryview, shard: str, key: str) -> None:
    """Raise ShardCorruptionError unless `value` is an intact sealed record."""
    view = memoryview(value)
    if len(view) <= _TRAILER_LEN or view[-_TRAILER_LEN:-4] != _TRAILER_PREFIX:
        raise ShardCorruptionError(shard, "record value has no valid crc32 trailer", key)
    if zlib.crc32(view[:-4]) != int.from_bytes(view[-4:], "big"):
        raise ShardCorruptionError(shard, "record crc32 mismatch (altered bytes)", key)


def unpack(value: bytes | memoryview, shard: str, key: str, checked: bool = False) -> dict:
    """Check (unless `checked` already) then msgpack-decode a sealed value into its raw payload
    dict (arrays still bytes)."""
    if not checked:
        check(value, shard, key)
    try:
        return msgpack.unpackb(value, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on malformed input
        raise ShardCorruptionError(shard, f"undecodable record ({type(exc).__name__})", key) from exc


def unseal_record(value: bytes | memoryview, shard: str, key: str) -> CrystalRecord:
    """Check and decode one sealed value into a CrystalRecord."""
    check(value, shard, key)
    try:
        return decode_record(bytes(value))
    except ValueError as exc:
        raise ShardCorruptionError(shard, str(exc), key) from exc


def record_key(index: int) -> str:
    """Zero-padded record index: sorts lexicographically in index order (LMDB keys, tar names)."""
    return f"{index:09d}"
