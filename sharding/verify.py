"""`verify_shards(dir)`: recheck everything the manifest promises, and name what is broken.

Per shard file: present, size and sha256 as recorded; per record: key sequence, crc32, decodable
as a CrystalRecord; per split: record count. Every problem is collected (not only the first), so
one report lists all broken shards; `xtalgen shard verify` exits 1 when there is any.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from xtalgen.sharding.codec import ShardCorruptionError, record_key, unseal_record
from xtalgen.sharding.lmdb_format import LmdbSplitReader
from xtalgen.sharding.manifest import file_sha256
from xtalgen.sharding.reader import check_file_size, open_shards
from xtalgen.sharding.webdataset_format import iter_tar_shard

MAX_PROBLEMS_PER_SHARD = 20


@dataclass(frozen=True)
class ShardProblem:
    shard: str  # file name relative to the shard directory
    detail: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.shard}" + (f" [key {self.key}]" if self.key else "") + f": {self.detail}"


@dataclass
class VerifyReport:
    path: Path
    format: str
    shards_checked: int = 0
    records_checked: int = 0
    problems: list[ShardProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def broken_shards(self) -> list[str]:
        return sorted({p.shard for p in self.problems})

    def summary(self) -> str:
        head = f"{self.path}: {self.format}, {self.shards_checked} files, {self.records_checked} records checked"
        if self.ok:
            return f"{head}: OK"
        lines = [f"{head}: {len(self.broken_shards)} broken file(s)"]
        lines += [f"  BROKEN {p}" for p in self.problems]
        return "\n".join(lines)


def verify_shards(shard_dir: str | Path, progress: bool = False) -> VerifyReport:
    """Check every shard file and record of a shard set against its manifest."""
    shards = open_shards(shard_dir)
    report = VerifyReport(path=shards.path, format=shards.format)
    entries = [entry for split in shards.splits for entry in shards.shards(split)]
    for entry in tqdm(entries, desc="verify", unit="shard", disable=not progress):
        problems = _check_shard(shards.path, shards.format, entry)
        report.shards_checked += 1
        report.records_checked += entry["num_records"] if not problems else 0
        report.problems += problems
    for split in shards.splits:
        index = shards.manifest["splits"][split]["num_atoms_index"]
        report.problems += _check_file(shards.path, index)
        report.shards_checked += 1
    return report


def _check_file(root: Path, entry: dict) -> list[ShardProblem]:
    """Presence, size and sha256 of one file."""
    try:
        check_file_size(root / entry["file"], entry)
    except ShardCorruptionError as exc:
        return [ShardProblem(entry["file"], exc.detail)]
    if file_sha256(root / entry["file"]) != entry["sha256"]:
        return [ShardProblem(entry["file"], "sha256 mismatch (file altered)")]
    return []


def _check_shard(root: Path, fmt: str, entry: dict) -> list[ShardProblem]:
    problems = _check_file(root, entry)
    if problems and fmt == "lmdb":
        if "sha256" not in problems[0].detail:
            return problems  # missing or resized: mapping it could crash the process, stop here
        problems += _check_records_isolated(root, fmt, entry)
    elif problems:
        problems += _check_records_of_altered_file(root, fmt, entry)
    else:
        problems += _check_records(root, fmt, entry)
    # A whole-file sha256 mismatch is reported once even if record checks name the key too.
    unique = list(dict.fromkeys(problems))
    return unique[:MAX_PROBLEMS_PER_SHARD]


def _check_records_isolated(root: Path, fmt: str, entry: dict) -> list[ShardProblem]:
    """`_check_records` in a child process: an altered LMDB file may have damaged B-tree pages,
    and walking those can crash the reading process outright (LMDB trusts its pages)."""
    # spawn, not fork: py-lmdb refuses a file that the parent (inherited state) has open.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_quiet_stderr) as pool:
            return pool.submit(_check_records_of_altered_file, root, fmt, entry).result()
    except BrokenProcessPool:
        return [ShardProblem(entry["file"], "LMDB pages damaged: reading the file crashes the reader")]


def _quiet_stderr() -> None:
    """Initializer of the isolated reader: LMDB prints an assertion (`mdb.c: Assertion 'IS_LEAF(mp)'
    failed`) before it aborts on a damaged page. The report says that in its own words, naming the
    shard, so the C message would only be noise after it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _check_records_of_altered_file(root: Path, fmt: str, entry: dict) -> list[ShardProblem]:
    """`_check_records` on a file whose sha256 already failed. Altered bytes can make a reader fail
    in ways no check anticipates; whatever it raises, the report must still name the shard (an
    error that escapes would end `shard verify` without its report)."""
    try:
        return _check_records(root, fmt, entry)
    except Exception as exc:  # the file is known broken; this only says how
        return [ShardProblem(entry["file"], f"unreadable ({type(exc).__name__}: {exc})")]


def _check_records(root: Path, fmt: str, entry: dict) -> list[ShardProblem]:
    """Decode every record of one shard; record-level damage does not stop the scan."""
    name, first, count = entry["file"], entry["first_index"], entry["num_records"]
    problems: list[ShardProblem] = []
    expected = first
    try:
        if fmt == "lmdb":
            items = ((int(k), v) for k, v in LmdbSplitReader(root / name, name, count).iter_items())
        else:
            items = iter_tar_shard(root / name, name, first, count)  # sha256 already checked
        for index, value in items:
            key = record_key(index)
            if index != expected:
                problems.append(ShardProblem(name, f"expected key {record_key(expected)}", key))
                break
            expected += 1
            try:
                unseal_record(value, name, key)
            except ShardCorruptionError as exc:
                problems.append(ShardProblem(name, exc.detail, key))
                if len(problems) >= MAX_PROBLEMS_PER_SHARD:
                    break
    except ShardCorruptionError as exc:
        problems.append(ShardProblem(name, exc.detail, exc.key))
        return problems
    if not problems and expected - first != count:
        problems.append(ShardProblem(name, f"holds {expected - first} records, manifest says {count}"))
    return problems
