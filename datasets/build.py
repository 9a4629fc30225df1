"""Build a shard set from raw inputs: parallel, deterministic, resumable.

    summary = build_shards(["data/mp_20"], "shards/mp_20", cfg.data, fmt="lmdb", workers=8)

1. Inputs are streamed (`iter_raw_items`) in a fixed global order and cut into chunks of
   `cfg.shard.chunk_size` items. Chunk boundaries depend only on the input, never on the number
   of workers.
2. Each chunk is parsed and validated in a process pool (`spawn` context: safe with torch and
   threads around) and written atomically, by the worker, to `OUT/.build/chunk-NNNNNN.msgpack`
   (accepted records encoded with `xtalgen.record.encode_record`, plus rejections). A killed
   build leaves only whole chunk files; running the same command again skips them. The input
   fingerprint (sources' sha256 + reader/validation config + chunk size) is kept in
   `OUT/.build/state.json`: an unfinished build of other inputs or another config is refused
   (`BuildStateError`) unless `restart=True`; a finished one is simply rebuilt.
3. Assembly, in global order: duplicate ids among accepted records (the later one is rejected as
   `duplicate_id`), split assignment (the input's own split when its file is named
   train/val/test, else a hash of the id), then `xtalgen.sharding.ShardSetWriter`, which writes
   the shards and finally `manifest.json`. `OUT/rejects.csv` lists every rejected input
   (`id,source,reason,detail`, in input order).
4. After the manifest is written the chunk files are deleted; `.build/state.json` stays (a few
   hundred bytes) so that re-running a finished build returns at once instead of redoing it.

Same input -> byte-identical shards, manifest and rejects for any worker count.

Steps 2 and 3 can also run as separate processes, on separate machines sharing OUT (a Slurm array,
`slurm/shard_array.sbatch`): `part=(i, n)` processes only the chunks k with k % n == i and stops
before assembly; `assemble_only=True` then assembles once every chunk is on disk, and names the
missing chunks and their parts otherwise. The chunk files are the same whoever writes them, so
the result is byte-identical to a single-process build, and a failed part is rerun alone.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import msgpack

from xtalgen.datasets.items import RawItem, Rejection
from xtalgen.datasets.properties import property_columns
from xtalgen.datasets.readers import BUILTIN_PREFIX, expand_inputs, iter_raw_items
from xtalgen.datasets.validation import parse_and_validate
from xtalgen.dirlock import LOCK_NAME, DirectoryLock
from xtalgen.diskspace import DiskFullError, from_os_error, is_out_of_space
from xtalgen.record import CrystalRecord, decode_record, encode_record
from xtalgen.schema import ConfigError
from xtalgen.schema.data import DataConfig, ReaderConfig, ShardConfig, ValidationConfig

BUILD_DIR = ".build"
RESUME_ADVICE = "free space there and run the same command again: it resumes from the chunks already done"
STATE_NAME = "state.json"
REJECTS_NAME = "rejects.csv"
REJECTS_COLUMNS = ("id", "source", "reason", "detail")
# Bump when chunk contents would change for the same input (parser, canonical form, encoding).
CHUNK_FORMAT_VERSION = 1


class BuildStateError(ConfigError):
    """OUT/.build belongs to a build of other inputs or another config."""


@dataclass
class BuildSummary:
    read: int
    accepted: int
    rejected: int
    by_reason: dict[str, int]
    by_split: dict[str, int]
    out_dir: Path
    manifest_path: Path
    rejects_path: Path

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.by_reason.items()) or "none"
        splits = ", ".join(f"{k} {v}" for k, v in self.by_split.items()) or "none"
        return (f"read {self.read} = accepted {self.accepted} + rejected {self.rejected}\n"
                f"  splits: {splits}\n  rejected by reason: {reasons}\n"
                f"  shards: {self.out_dir}  manifest: {self.manifest_path}  rejects: {self.rejects_path}")


@dataclass
class PartSummary:
    """What one `part=(i, n)` process did: its chunks of the `num_chunks` the input holds."""
    part: int
    parts: int
    chunks: int  # chunks of this part (done now or found done)
    skipped: int  # of those, already on disk from an earlier run
    num_chunks: int
    out_dir: Path
    assembled: bool = False  # OUT already holds the finished set of these inputs: nothing to do

    def describe(self) -> str:
        if self.assembled:
            return f"part {self.part} of {self.parts}: {self.out_dir} is already built from these inputs and config"
        return (f"part {self.part} of {self.parts}: {self.chunks} of {self.num_chunks} chunks "
                f"({self.skipped} already done) in {self.out_dir / BUILD_DIR}")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def build_shards(
    inputs: Sequence[str],
    out_dir: str | Path,
    cfg: DataConfig,
    *,
    fmt: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    restart: bool = False,
    part: tuple[int, int] | None = None,
    assemble_only: bool = False,
) -> BuildSummary | PartSummary:
    """Read, validate and shard `inputs` into `out_dir`; see the module docstring.

    `part=(i, n)`: only chunks k % n == i, no assembly (returns a PartSummary). `assemble_only`:
    assemble chunks that parts wrote, refusing if any is missing.
    """
    from xtalgen.sharding import FORMATS

    fmt = fmt or cfg.shard.format
    workers = int(workers or cfg.shard.workers or 1)
    if fmt not in FORMATS:
        raise ConfigError(f"config key 'data.shard.format': unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if not inputs:
        raise ConfigError("no inputs given")
    _check_split_config(cfg.shard)
    try:
        property_columns([], cfg.reader)  # a malformed property mapping is a config error, not a bad file
    except ValueError as exc:
        raise ConfigError(f"config key 'data.reader.properties': {exc}") from None
    if cfg.shard.chunk_size < 1:
        raise ConfigError("config key 'data.shard.chunk_size': must be >= 1")

    _check_part_options(part, assemble_only, restart)
    _check_inputs_exist(inputs)

    out_dir = Path(out_dir)
    # Held for the whole build, before anything is read or written: a second build into OUT would
    # use the same temporary names and clear this one's (OutputInUseError names the holder). The
    # parts of an array share OUT, so each locks only against a second copy of itself.
    lock_name = f".xtalgen-build-part{part[0]}.lock" if part else LOCK_NAME
    with DirectoryLock(out_dir, name=lock_name):
        try:
            if part:
                return _build_part(inputs, out_dir, cfg, part, workers=workers, progress=progress)
            return _build_locked(inputs, out_dir, cfg, fmt=fmt, workers=workers, progress=progress,
                                 restart=restart, assemble_only=assemble_only)
        except OSError as exc:  # a full disk anywhere else (the build state, rejects.csv): one line
            if not is_out_of_space(exc):
                raise
            raise from_os_error(exc, out_dir).with_estimate(None, None, advice=RESUME_ADVICE) from None


def _build_locked(inputs: Sequence[str], out_dir: Path, cfg: DataConfig, *, fmt: str, workers: int,
                  progress: bool, restart: bool, assemble_only: bool = False) -> BuildSummary:
    build_dir = out_dir / BUILD_DIR
    inputs = _input_files(inputs, out_dir)
    sources = source_fingerprints(inputs, progress=progress)
    fingerprint = build_fingerprint(sources, cfg)
    assembly = assembly_settings(cfg, fmt)
    if restart and build_dir.exists():
        shutil.rmtree(build_dir)
    state = _load_state(build_dir)
    if state is not None:
        finished = state.get("summary")
        if state.get("fingerprint") != fingerprint:
            if not finished:  # resuming would mix chunks of two different builds
                raise BuildStateError(
                    f"{build_dir} holds an unfinished build of other inputs or another reader/validation "
                    "config; run the original command again to finish it, or pass --restart "
                    "(restart=True) to discard it and start over"
                )
            _log(progress, f"{out_dir}: inputs or config changed since the last build; rebuilding")
            shutil.rmtree(build_dir)
        elif finished and state.get("assembly") == assembly and (out_dir / "manifest.json").exists():
            _log(progress, f"{out_dir} is up to date with these inputs and config (restart=True rebuilds)")
            return _summary_from_dict(finished)
    if assemble_only:
        num_chunks = _check_all_chunks_done(inputs, build_dir, cfg, state, fingerprint)
        return _assemble_and_record(build_dir, num_chunks, out_dir, cfg, fmt=fmt, sources=sources,
                                    fingerprint=fingerprint, assembly=assembly, progress=progress)
    build_dir.mkdir(parents=True, exist_ok=True)
    for stale in build_dir.glob("*.tmp"):  # half-written chunk of a killed build
        stale.unlink()
    _write_json(build_dir / STATE_NAME, {"fingerprint": fingerprint, "sources": sources})

    try:
        num_chunks = run_chunks(inputs, build_dir, cfg, workers=workers, progress=progress)
    except DiskFullError as exc:
        # How many chunks are still to come is unknown while the inputs stream; the shards will hold
        # the same records as the chunks, so they need at least about what the chunks took so far.
        written = _bytes_in(build_dir, "chunk-*.msgpack") or None  # none yet: nothing to estimate from
        raise exc.with_estimate(written, written, at_least=True, advice=RESUME_ADVICE) from None
    return _assemble_and_record(build_dir, num_chunks, out_dir, cfg, fmt=fmt, sources=sources,
                                fingerprint=fingerprint, assembly=assembly, progress=progress)


def _assemble_and_record(build_dir: Path, num_chunks: int, out_dir: Path, cfg: DataConfig, *, fmt: str,
                         sources: list[dict], fingerprint: str, assembly: dict, progress: bool) -> BuildSummary:
    summary = assemble(build_dir, num_chunks, out_dir, cfg, fmt=fmt, sources=sources, progress=progress)
    _write_json(build_dir / STATE_NAME, {"fingerprint": fingerprint, "sources": sources,
                                         "assembly": assembly, "summary": summary.to_dict()})
    for leftover in [*build_dir.glob("chunk-*.msgpack"), *build_dir.glob("part*.json")]:
        leftover.unlink()
    return summary


# ---------------------------------------------------------------------------------------------
# Parts: one slice of the chunks per process (Slurm array tasks), then one assembly
# ---------------------------------------------------------------------------------------------
PARTS_NAME = "parts.json"


def _check_part_options(part: tuple[int, int] | None, assemble_only: bool, restart: bool) -> None:
    if assemble_only and restart:
        raise ConfigError("--assemble cannot be combined with --restart (it would discard the parts' chunks)")
    if part is None:
        return
    index, count = part
    if not 0 <= index < count:
        raise ConfigError(f"--part {index}/{count}: the part must be in 0..{count - 1} (I/N, 0-based)")
    if assemble_only or restart:
        # --restart would delete chunk files that other parts are writing at the same time.
        raise ConfigError(f"--part cannot be combined with {'--assemble' if assemble_only else '--restart'}")


def _build_part(inputs: Sequence[str], out_dir: Path, cfg: DataConfig, part: tuple[int, int], *,
                workers: int, progress: bool) -> PartSummary:
    """Process this part's chunks into OUT/.build; the parts run at the same time, so nothing here
    may remove or rewrite what another part writes (no --restart, per-process temporary names)."""
    build_dir = out_dir / BUILD_DIR
    inputs = _input_files(inputs, out_dir)
    sources = source_fingerprints(inputs, progress=progress)
    fingerprint = build_fingerprint(sources, cfg)
    state = _load_state(build_dir)
    if state is not None and state.get("fingerprint") != fingerprint:
        raise BuildStateError(f"{build_dir} holds a build of other inputs or another reader/validation config; "
                              "parts never discard it: build into a new --out, or remove this one")
    if state is not None and state.get("summary") and (out_dir / "manifest.json").exists():
        return PartSummary(part[0], part[1], 0, 0, 0, out_dir, assembled=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    _claim_part_count(build_dir, part[1])
    for stale in build_dir.glob("chunk-*.tmp"):  # this part's half-written chunks of a killed run
        if int(stale.name.split("-")[1].split(".")[0]) % part[1] == part[0]:
            stale.unlink(missing_ok=True)
    if state is None:
        _write_json(build_dir / STATE_NAME, {"fingerprint": fingerprint, "sources": sources})
    num_chunks, done, skipped = run_chunks(inputs, build_dir, cfg, workers=workers, progress=progress, part=part,
                                           counts=True)
    _write_json(build_dir / f"part-{part[0]}-of-{part[1]}.json", {"chunks": done, "num_chunks": num_chunks})
    return PartSummary(part[0], part[1], len(done), skipped, num_chunks, out_dir)


def _claim_part_count(build_dir: Path, count: int) -> None:
    """Record N the first time a part runs; a part that says another N would own other chunks."""
    path = build_dir / PARTS_NAME
    try:
        with open(path, "x") as handle:  # exclusive create: the first part of the array wins
            handle.write(json.dumps({"parts": count}) + "\n")
        return
    except FileExistsError:
        pass
    try:
        recorded = json.loads(path.read_text())["parts"]
    except (ValueError, KeyError):  # a part that is writing it right now; the contents are the same
        return
    if recorded != count:
        raise ConfigError(f"{build_dir} is split into {recorded} parts by an earlier task, not {count}; "
                          f"rerun a part as --part I/{recorded}")


def _check_all_chunks_done(inputs: Sequence[str], build_dir: Path, cfg: DataConfig, state: dict | None,
                           fingerprint: str) -> int:
    """The number of chunks, once each is on disk; otherwise a ConfigError naming the missing
    chunks and the parts that owe them (read from parts.json)."""
    if state is None or state.get("fingerprint") != fingerprint:
        raise ConfigError(f"{build_dir}: no part of a build of these inputs and this config has run; "
                          "run the --part I/N tasks first (or build without --assemble)")
    num_chunks = sum(1 for _ in iter_chunks(iter_raw_items(inputs, cfg.reader), cfg.shard.chunk_size))
    missing = [k for k in range(num_chunks) if not chunk_path(build_dir, k).exists()]
    if not missing:
        return num_chunks
    try:
        count = json.loads((build_dir / PARTS_NAME).read_text())["parts"]
        owners = " (" + ", ".join(f"part {i}/{count}" for i in sorted({k % count for k in missing})) + ")"
    except (OSError, ValueError, KeyError):
        owners = ""
    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
    raise ConfigError(f"{len(missing)} of {num_chunks} chunks are not built yet: {shown}{owners}; rerun those "
                      "parts, or build without --assemble to make them here")


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------
def _check_inputs_exist(inputs: Sequence[str]) -> None:
    """A missing input or an unknown builtin set is a mistake in the command, not a bad record: refuse
    the build before anything is written (a file that exists but cannot be read is a rejection)."""
    from xtalgen.datasets.builtin import BUILTIN_SETS

    for name in map(str, inputs):
        if name.startswith(BUILTIN_PREFIX):
            dataset = name[len(BUILTIN_PREFIX):]
            if dataset not in BUILTIN_SETS:
                choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SETS)
                raise ConfigError(f"input {name}: unknown builtin set {dataset!r}; available: {choices}")
        elif not os.path.exists(name):
            raise ConfigError(f"input {name}: no such file or folder")


def _input_files(inputs: Sequence[str], out_dir: Path) -> list[str]:
    """Inputs with folders expanded, minus anything inside `out_dir` (its own rejects.csv when
    the output folder sits inside an input folder)."""
    out = out_dir.resolve()
    return [name for name in expand_inputs(inputs)
            if name.startswith(BUILTIN_PREFIX) or out not in Path(name).resolve().parents]


def file_digest(path: str | Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def source_fingerprints(inputs: Sequence[str], progress: bool = False) -> list[dict]:
    """{"path", "sha256", "bytes"} of every input file (folders expanded; missing files: None)."""
    from xtalgen.datasets.builtin import builtin_fingerprint

    _log(progress, f"hashing {len(inputs)} input(s)")
    out = []
    for name in expand_inputs(inputs):
        if name.startswith(BUILTIN_PREFIX):
            out.append(builtin_fingerprint(name))
        elif os.path.isfile(name):
            sha, size = file_digest(name)
            out.append({"path": name, "sha256": sha, "bytes": size})
        else:
            out.append({"path": name, "sha256": None, "bytes": None})
    return out


def build_fingerprint(sources: list[dict], cfg: DataConfig) -> str:
    """What the chunk files depend on: the inputs, reader and validation config, chunk size."""
    key = {
        "version": CHUNK_FORMAT_VERSION,
        "sources": sources,
        "reader": dataclasses.asdict(cfg.reader),
        "validation": dataclasses.asdict(cfg.validation),
        "chunk_size": cfg.shard.chunk_size,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def assembly_settings(cfg: DataConfig, fmt: str) -> dict:
    """What the final shard set depends on beyond the chunks (never the worker count)."""
    return {"format": fmt, "records_per_shard": cfg.shard.records_per_shard,
            "split": cfg.shard.split, "split_fractions": dict(cfg.shard.split_fractions)}


# ---------------------------------------------------------------------------------------------
# Parallel, resumable chunk processing
# ---------------------------------------------------------------------------------------------
def chunk_path(build_dir: Path, k: int) -> Path:
    return build_dir / f"chunk-{k:06d}.msgpack"


def iter_chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def process_chunk(
    k: int, items: list[RawItem | Rejection], build_dir: str, reader: ReaderConfig, validation: ValidationConfig
) -> int:
    """Parse + validate one chunk and write its results file atomically. Runs in a worker."""
    results = []
    for item in items:
        result = parse_and_validate(item, reader, validation)
        if isinstance(result, CrystalRecord):
            results.append(["r", result.id, item.source, item.split, encode_record(result)])
        else:
            results.append(["x", result.id, result.source, result.reason, result.detail])
    path = chunk_path(Path(build_dir), k)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    payload = msgpack.packb({"v": CHUNK_FORMAT_VERSION, "chunk": k, "results": results}, use_bin_type=True)
    try:
        tmp.write_bytes(payload)
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # frees what it took; a rerun redoes this chunk
        if not is_out_of_space(exc):
            raise
        raise from_os_error(exc, path) from None
    os.replace(tmp, path)
    return len(items)


def run_chunks(inputs: Sequence[str], build_dir: Path, cfg: DataConfig, *, workers: int, progress: bool,
               part: tuple[int, int] | None = None, counts: bool = False):
    """Process every chunk not already on disk; returns the number of chunks.

    With `part=(i, n)` only the chunks k % n == i (the stream is still read whole: chunk
    boundaries come from it). With `counts`, returns (number of chunks, this part's chunks, skipped).
    """
    from tqdm import tqdm

    stream = iter_raw_items(inputs, cfg.reader)
    bar = tqdm(desc="parse+validate", unit=" structures", disable=not progress, file=sys.stderr, smoothing=0.05)
    skipped = 0
    chunks = _Chunks(stream, cfg.shard.chunk_size, part)
    if workers <= 1:
        for k, chunk in chunks:
            if chunk_path(build_dir, k).exists():
                skipped += 1
            else:
                process_chunk(k, chunk, str(build_dir), cfg.reader, cfg.validation)
            bar.update(len(chunk))
    else:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending: dict[futures.Future, int] = {}
            for k, chunk in chunks:
                if chunk_path(build_dir, k).exists():
                    skipped += 1
                    bar.update(len(chunk))
                    continue
                # Bounded look-ahead: the reader never runs far ahead of the workers (memory).
                while len(pending) >= 2 * workers:
                    bar.update(_collect(pending, futures.FIRST_COMPLETED))
                future = pool.submit(process_chunk, k, chunk, str(build_dir), cfg.reader, cfg.validation)
                pending[future] = len(chunk)
            while pending:
                bar.update(_collect(pending, futures.ALL_COMPLETED))
    bar.close()
    num_chunks = chunks.total  # all of the input's chunks, also those of other parts
    if skipped:
        _log(progress, f"resumed: {skipped} of {len(chunks.mine)} chunks were already done")
    return (num_chunks, chunks.mine, skipped) if counts else num_chunks


class _Chunks:
    """(k, chunk) for every chunk of the stream, or only those k % n == i of `part=(i, n)`.
    After iteration `total` is the number of chunks in the input and `mine` the ks yielded."""

    def __init__(self, stream: Iterable, size: int, part: tuple[int, int] | None):
        self.stream, self.size, self.part = stream, size, part
        self.total, self.mine = 0, []

    def __iter__(self) -> Iterator[tuple[int, list]]:
        for k, chunk in enumerate(iter_chunks(self.stream, self.size)):
            self.total = k + 1
            if self.part is None or k % self.part[1] == self.part[0]:
                self.mine.append(k)
                yield k, chunk


def _collect(pending: dict, mode) -> int:
    done, _ = futures.wait(pending, return_when=mode)
    finished = 0
    for future in done:
        future.result()  # re-raise a worker crash here, with its traceback
        finished += pending.pop(future)
    return finished


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------
def _check_split_config(shard: ShardConfig) -> None:
    fractions = dict(shard.split_fractions)
    if shard.split in ("auto", "hash"):
        if not fractions or any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
            raise ConfigError(f"config key 'data.shard.split_fractions': must be >= 0 and sum to 1, got {fractions}")


def hash_fraction(record_id: str) -> float:
    """A uniform number in [0, 1) from the id: sha256 -> first 8 bytes."""
    digest = hashlib.sha256(record_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(record_id: str, input_split: str | None, shard: ShardConfig) -> str:
    """The input's own split (mode auto), else by hash of the id; or one fixed split."""
    if shard.split not in ("auto", "hash"):
        return shard.split
    if shard.split == "auto" and input_split:
        return input_split
    u = hash_fraction(record_id)
    cumulative = 0.0
    names = list(shard.split_fractions)
    for name in names:
        cumulative += shard.split_fractions[name]
        if u < cumulative:
            return name
    return names[-1]  # rounding of the cumulative sum


def chunk_results(build_dir: Path, k: int) -> list[list]:
    path = chunk_path(build_dir, k)
    payload = msgpack.unpackb(path.read_bytes(), raw=False)
    if payload.get("v") != CHUNK_FORMAT_VERSION or payload.get("chunk") != k:
        raise RuntimeError(f"{path} is not chunk {k} of this build; rerun with --restart")
    return payload["results"]


def iter_chunk_results(build_dir: Path, num_chunks: int) -> Iterator[list]:
    for k in range(num_chunks):
        yield from chunk_results(build_dir, k)


def assemble(
    build_dir: Path, num_chunks: int, out_dir: Path, cfg: DataConfig, *, fmt: str, sources: list[dict],
    progress: bool,
) -> BuildSummary:
    from tqdm import tqdm

    from xtalgen.sharding import ShardSetWriter

    writer = ShardSetWriter(out_dir, fmt=fmt, records_per_shard=cfg.shard.records_per_shard)
    rejects_path = out_dir / REJECTS_NAME
    rejects_tmp = rejects_path.with_name(REJECTS_NAME + ".tmp")
    seen_ids: dict[str, str] = {}  # id -> source of the accepted record
    by_reason: Counter[str] = Counter()
    by_split: Counter[str] = Counter()
    read = 0
    chunk_bytes = [chunk_path(build_dir, k).stat().st_size for k in range(num_chunks)]
    position = [0, 0, 1]  # chunk, entries done in it, its entries: how far the shards have got
    bar = tqdm(desc="write shards", unit=" structures", disable=not progress, file=sys.stderr)
    try:
        with writer, bar, open(rejects_tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            rejects = csv.writer(handle, lineterminator="\n")
            rejects.writerow(REJECTS_COLUMNS)
            for k in range(num_chunks):
                results = chunk_results(build_dir, k)
                position[:] = [k, 0, len(results)]
                for entry in results:
                    read += 1
                    position[1] += 1
                    bar.update(1)
                    if entry[0] == "x":
                        _, rid, source, reason, detail = entry
                    else:
                        _, rid, source, input_split, data = entry
                        if rid not in seen_ids:
                            seen_ids[rid] = source
                            split = assign_split(rid, input_split, cfg.shard)
                            writer.add(split, decode_record(data))
                            by_split[split] += 1
                            continue
                        reason, detail = "duplicate_id", f"id already accepted from {seen_ids[rid]}"
                    by_reason[reason] += 1
                    rejects.writerow([rid, source, reason, detail])
            os.replace(rejects_tmp, rejects_path)
            config = dataclasses.asdict(cfg)
            config["shard"].update(format=fmt, workers=None)  # the worker count never changes the output
            config["shards"] = ""
            writer.finalize(sources=sources, rejected=dict(sorted(by_reason.items())), config=config)
    except (DiskFullError, OSError) as exc:
        if isinstance(exc, OSError) and not is_out_of_space(exc):
            raise
        if isinstance(exc, OSError):  # only rejects.csv is written here other than through the writer
            exc = from_os_error(exc, rejects_tmp).with_estimate(None, None)
        written = (exc.written or 0) + (rejects_tmp.stat().st_size if rejects_tmp.exists() else 0)
        rejects_tmp.unlink(missing_ok=True)
        k, done, total = position
        fraction = (sum(chunk_bytes[:k]) + chunk_bytes[k] * done / max(total, 1)) / max(sum(chunk_bytes), 1) \
            if chunk_bytes else 1.0
        # The shards grow in step with the chunks they are read from: what they took for the chunks
        # read so far, scaled to all of them, is what the whole set takes.
        if 0 < fraction < 1 and written:
            needed, at_least = round(written / fraction) - written, False
        else:
            # Stopped once every record was handed over (closing a shard): the records themselves,
            # as the chunks hold them, are the least the set takes; headers and pages come on top.
            needed, at_least = max(sum(chunk_bytes) - written, 0) or None, True
        raise exc.with_estimate(written, needed, at_least=at_least, advice=RESUME_ADVICE) from None
    accepted = sum(by_split.values())
    return BuildSummary(
        read=read, accepted=accepted, rejected=read - accepted,
        by_reason=dict(sorted(by_reason.items())), by_split=dict(sorted(by_split.items())),
        out_dir=out_dir, manifest_path=out_dir / "manifest.json", rejects_path=rejects_path,
    )


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parts of an array write state.json at once
    try:
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if not is_out_of_space(exc):
            raise
        raise from_os_error(exc, path) from None
    os.replace(tmp, path)


def _bytes_in(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def _load_state(build_dir: Path) -> dict | None:
    path = build_dir / STATE_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"fingerprint": None}  # unreadable state: treated as another build


def _summary_from_dict(d: dict) -> BuildSummary:
    return BuildSummary(
        read=d["read"], accepted=d["accepted"], rejected=d["rejected"], by_reason=d["by_reason"],
        by_split=d["by_split"], out_dir=Path(d["out_dir"]), manifest_path=Path(d["manifest_path"]),
        rejects_path=Path(d["rejects_path"]),
    )


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)
