"""Sampling outputs on disk: CIFs, one extxyz, and a JSONL that is the commit log.

Layout of an output directory:

    request.json                  what was asked (resume refuses a different request)
    cifs/<id>.cif                 one CIF per structure (pymatgen CifWriter), written atomically
    samples.jsonl                 one JSON line per structure: id, seed, batch, conditions, ...
    samples.extxyz                every structure, one frame each (ase), `id` in the frame info
    samples.rank{r}.jsonl/.extxyz one part per rank when several ranks sample; merged at the end

A batch is written in a fixed order: CIFs, then extxyz frames (flushed and fsynced), then all its
JSONL lines in one write, fsynced. The JSONL is the commit log: a batch is done exactly when all of
its lines are there. Anything else (a partial last line, lines of a batch cut short, frames or CIFs
of an uncommitted batch) is a leftover of a killed run, dropped on the next start and redone.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xtalgen.sampling.plan import SamplingPlan
from xtalgen.schema import ConfigError

JSONL_NAME = "samples.jsonl"
EXTXYZ_NAME = "samples.extxyz"
REQUEST_NAME = "request.json"
CIF_DIR = "cifs"
_PART_RE = re.compile(r"^samples\.rank(\d+)\.jsonl$")
_ID_RE = re.compile(rb"(?:^|\s)id=([A-Za-z0-9_.-]+)(?=\s|$)")


# --- paths ------------------------------------------------------------------------------------
def part_paths(out_dir: Path, rank: int, world_size: int) -> tuple[Path, Path]:
    """(jsonl, extxyz) a rank appends to. A single rank writes the final files directly."""
    if world_size == 1:
        return out_dir / JSONL_NAME, out_dir / EXTXYZ_NAME
    return out_dir / f"samples.rank{rank}.jsonl", out_dir / f"samples.rank{rank}.extxyz"


def rank_parts(out_dir: Path) -> list[tuple[Path, Path]]:
    """Every per-rank part present, ordered by rank."""
    found = []
    for path in out_dir.glob("samples.rank*.jsonl"):
        match = _PART_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [(p, p.with_suffix(".extxyz")) for _, p in sorted(found)]


def all_sources(out_dir: Path) -> list[tuple[Path, Path]]:
    """The final files first, then every rank part: the places committed structures can live."""
    return [(out_dir / JSONL_NAME, out_dir / EXTXYZ_NAME), *rank_parts(out_dir)]


def cif_path(out_dir: Path, sample_id: str) -> Path:
    return out_dir / CIF_DIR / f"{sample_id}.cif"


# --- the request ------------------------------------------------------------------------------
def check_or_write_request(out_dir: Path, request: dict, informational: Sequence[str] = ()) -> None:
    """Record the request on first start; on resume refuse one that would make other structures.

    Keys in `informational` are recorded but may differ on resume (e.g. the model file's path).
    """
    path = out_dir / REQUEST_NAME
    if path.exists():
        previous = json.loads(path.read_text())
        keys = (set(previous) | set(request)) - set(informational)
        changed = sorted(k for k in keys if previous.get(k) != request.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {request.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{out_dir} holds samples of a different request ({details}); "
                "use a new --out directory, or delete this one to start over"
            )
        return
    _atomic_write_text(path, json.dumps(request, indent=2, sort_keys=True) + "\n")


# --- reading the commit log -------------------------------------------------------------------
def read_jsonl_lines(path: Path) -> list[tuple[dict, str]]:
    """(row, raw line) for every complete, parseable line; a torn last line is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn write of a killed run
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row and "batch" in row:
            rows.append((row, line))
    return rows


def committed_lines(path: Path, plan: SamplingPlan) -> dict[int, list[str]]:
    """batch -> its raw JSONL lines in plan order, for every batch whose lines are all present."""
    by_batch: dict[int, dict[str, str]] = {}
    for row, line in read_jsonl_lines(path):
        batch = row["batch"]
        if isinstance(batch, int) and 0 <= batch < plan.num_batches:
            by_batch.setdefault(batch, {}).setdefault(row["id"], line)
    done = {}
    for batch, lines in by_batch.items():
        ids = plan.batch_ids(batch)
        if set(lines) == set(ids):
            done[batch] = [lines[i] for i in ids]
    return done


def committed_batches(out_dir: Path, plan: SamplingPlan) -> set[int]:
    """Batches committed in any part of `out_dir` (final files or any rank's part)."""
    done: set[int] = set()
    for jsonl, _ in all_sources(out_dir):
        done.update(committed_lines(jsonl, plan))
    return done


@dataclass(frozen=True)
class Frame:
    """Where one complete extxyz frame lies in a file (frames are copied as bytes, never re-parsed)."""

    id: str
    path: Path
    offset: int
    length: int


def iter_extxyz_frames(path: Path) -> Iterator[Frame]:
    """Every complete frame of an extxyz file; stops at a frame cut short by a kill.

    Frames are split as text (count line, comment line, count atom lines) and located by byte
    offset, so parts are merged byte for byte in bounded memory; only the comment line is parsed,
    for its id.
    """
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        while True:
            offset = handle.tell()
            count_line = handle.readline()
            if not count_line:
                return
            try:
                count = int(count_line.strip())
            except ValueError:
                return  # not a frame start: a torn write
            comment = handle.readline()
            if not comment.endswith(b"\n"):
                return
            for _ in range(count):
                if not handle.readline().endswith(b"\n"):
                    return
            sample_id = _frame_id(comment)
            if sample_id is not None:
                yield Frame(sample_id, path, offset, handle.tell() - offset)


def _frame_id(comment: bytes) -> str | None:
    """The `id` of an extxyz comment line. Our ids (`sample-000012`) are written unquoted, so a regex
    finds them ~20x faster than ase's general key=value parser, which stays the fallback."""
    match = _ID_RE.search(comment)
    if match:
        return match.group(1).decode()
    from ase.io.extxyz import key_val_str_to_dict

    info = key_val_str_to_dict(comment.decode())
    return str(info["id"]) if "id" in info else None


def copy_frames(frames: Iterable[Frame], out: Path) -> None:
    """Write the given frames, in order, atomically into `out` (streamed; sources kept open)."""
    handles: dict[Path, object] = {}
    tmp = _tmp_path(out)
    try:
        with tmp.open("wb") as sink:
            for frame in frames:
                if frame.path not in handles:
                    handles[frame.path] = frame.path.open("rb")
                source = handles[frame.path]
                source.seek(frame.offset)
                sink.write(source.read(frame.length))
            sink.flush()
            os.fsync(sink.fileno())
    finally:
        for handle in handles.values():
            handle.close()
    os.replace(tmp, out)


# --- writing ----------------------------------------------------------------------------------
@dataclass
class PartWriter:
    """Appends finished batches to one rank's part of the output, after recovering it.

    On construction the part is cut back to its committed batches: a torn JSONL tail and the lines
    of a batch cut short are dropped, and extxyz frames are kept only for committed ids (once each).
    """

    out_dir: Path
    plan: SamplingPlan
    rank: int = 0
    world_size: int = 1
    recovered_batches: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        (self.out_dir / CIF_DIR).mkdir(parents=True, exist_ok=True)
        self.jsonl_path, self.extxyz_path = part_paths(self.out_dir, self.rank, self.world_size)
        self.recovered_batches = self._recover()

    def _recover(self) -> set[int]:
        done = committed_lines(self.jsonl_path, self.plan)
        lines = [line for batch in sorted(done) for line in done[batch]]
        if self.jsonl_path.exists() and "".join(lines) != self.jsonl_path.read_text():
            _atomic_write_text(self.jsonl_path, "".join(lines))
        keep = {json.loads(line)["id"] for line in lines}
        if self.extxyz_path.exists():
            kept, seen, total = [], set(), 0
            for frame in iter_extxyz_frames(self.extxyz_path):
                total += 1
                if frame.id in keep and frame.id not in seen:
                    seen.add(frame.id)
                    kept.append(frame)
            clean = len(kept) == total and self.extxyz_path.stat().st_size == sum(f.length for f in kept)
            if not clean:
                copy_frames(kept, self.extxyz_path)
        return set(done)

    def write_batch(self, rows: Sequence[dict], structures: Sequence) -> None:
        """Write one batch: CIFs, then extxyz frames, then the JSONL lines (the commit)."""
        for row, structure in zip(rows, structures):
            row["cif"] = _write_cif(self.out_dir, row["id"], structure)
        frames = "".join(_extxyz_frame(row, s) for row, s in zip(rows, structures))
        _append_durably(self.extxyz_path, frames)
        _append_durably(self.jsonl_path, "".join(json.dumps(row) + "\n" for row in rows))


def _write_cif(out_dir: Path, sample_id: str, structure) -> str | None:
    """Write cifs/<id>.cif atomically; returns its path relative to out_dir (None if unwritable)."""
    from pymatgen.io.cif import CifWriter

    path = cif_path(out_dir, sample_id)
    try:
        text = str(CifWriter(structure))
    except Exception:  # a degenerate lattice from an untrained model must not stop the run
        return None
    _atomic_write_text(path, text, durable=False)
    return str(path.relative_to(out_dir))


def _extxyz_frame(row: dict, structure) -> str:
    import io

    from ase import Atoms
    from ase.io import write

    cell = structure.lattice.matrix  # (3, 3)
    # Cartesian positions from frac @ cell: ase's scaled_positions needs an invertible cell, and an
    # untrained model can return a degenerate one that must still be recorded.
    atoms = Atoms(numbers=[site.specie.Z for site in structure], positions=structure.frac_coords @ cell,
                  cell=cell, pbc=True)
    atoms.info["id"] = row["id"]
    atoms.info["batch"] = row["batch"]
    buffer = io.StringIO()
    write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def _append_durably(path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _tmp_path(path: Path) -> Path:
    # Host and pid in the name: ranks on several nodes may share the directory (and a pid).
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Write to a private temporary file, then rename over `path`: readers never see half a file."""
    tmp = _tmp_path(path)
    with tmp.open("w") as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


# --- merging ----------------------------------------------------------------------------------
@dataclass
class MergeReport:
    num_structures: int
    num_batches: int
    missing_batches: list[int]
    jsonl: Path
    extxyz: Path

    @property
    def complete(self) -> bool:
        return not self.missing_batches


def merge_parts(out_dir: str | Path, plan: SamplingPlan | None = None) -> MergeReport:
    """Union of every committed batch into samples.jsonl / samples.extxyz, ordered by id.

    Idempotent and safe to repeat after a crash: nothing is removed before the union is in place,
    and rank parts are removed only once every batch of the request is committed (so no rank can
    still be writing to them).
    """
    out_dir = Path(out_dir)
    if plan is None:
        plan = load_plan(out_dir)
    with _merge_lock(out_dir):
        return _merge_locked(out_dir, plan)


@contextmanager
def _merge_lock(out_dir: Path):
    """One merge at a time per directory (rank 0 and a hand-run `--merge` may overlap)."""
    import fcntl

    with (out_dir / ".merge.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _merge_locked(out_dir: Path, plan: SamplingPlan) -> MergeReport:
    sources = all_sources(out_dir)
    lines_by_batch: dict[int, list[str]] = {}
    for jsonl, _ in sources:
        for batch, lines in committed_lines(jsonl, plan).items():
            lines_by_batch.setdefault(batch, lines)
    wanted = {plan.sample_id(i) for b in lines_by_batch for i in plan.batch_indices(b)}
    frames: dict[str, Frame] = {}
    for _, extxyz in sources:
        for frame in iter_extxyz_frames(extxyz):
            if frame.id in wanted:
                frames.setdefault(frame.id, frame)
    missing_frames = sorted(wanted - set(frames))
    if missing_frames:
        raise RuntimeError(
            f"{out_dir}: {len(missing_frames)} committed structures have no extxyz frame "
            f"(first: {missing_frames[0]}); the output directory was altered"
        )
    batches = sorted(lines_by_batch)
    # Frames before lines, as in a batch write: a crash in between leaves a consistent state.
    copy_frames((frames[sid] for b in batches for sid in plan.batch_ids(b)), out_dir / EXTXYZ_NAME)
    _atomic_write_text(out_dir / JSONL_NAME, "".join(line for b in batches for line in lines_by_batch[b]))
    missing = sorted(set(range(plan.num_batches)) - set(batches))
    if not missing:
        for jsonl, extxyz in rank_parts(out_dir):
            extxyz.unlink(missing_ok=True)
            jsonl.unlink(missing_ok=True)
    return MergeReport(
        num_structures=sum(len(plan.batch_indices(b)) for b in batches),
        num_batches=plan.num_batches,
        missing_batches=missing,
        jsonl=out_dir / JSONL_NAME,
        extxyz=out_dir / EXTXYZ_NAME,
    )


def load_plan(out_dir: Path) -> SamplingPlan:
    path = Path(out_dir) / REQUEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{out_dir} is not a sampling output directory (no {REQUEST_NAME})")
    request = json.loads(path.read_text())
    return SamplingPlan(request["num_samples"], request["batch_size"], request["seed"])


def read_samples(out_dir: str | Path) -> list[dict]:
    """The merged per-structure rows of an output directory, in id order."""
    return [row for row, _ in read_jsonl_lines(Path(out_dir) / JSONL_NAME)]


def structures_from_rows(rows: Iterable[dict], out_dir: str | Path) -> list:
    """Read back the CIFs of `rows` as pymatgen structures (None where no CIF was written)."""
    from pymatgen.core import Structure

    out_dir = Path(out_dir)
    return [Structure.from_file(out_dir / row["cif"]) if row.get("cif") else None for row in rows]


def batch_to_structures(lattice: np.ndarray, frac_coords: np.ndarray, atomic_numbers: np.ndarray,
                        num_atoms: np.ndarray) -> list:
    """Split flat sampler output into pymatgen structures (float64 numpy inputs)."""
    from pymatgen.core import Lattice, Structure

    structures, start = [], 0
    for b, n in enumerate(num_atoms.tolist()):
        stop = start + n
        structures.append(
            Structure(
                Lattice(lattice[b]),
                atomic_numbers[start:stop].tolist(),
                frac_coords[start:stop],
                coords_are_cartesian=False,
            )
        )
        start = stop
    return structures
