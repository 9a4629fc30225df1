"""Energy above the convex hull against a reference set computed with the evaluation potential.

Energies of generated structures only mean something next to references computed with the same
potential, so the reference set is built here, once, and cached:

* training (reference) structures relaxed with the potential, one JSONL line per structure in
  `CACHE/references/<key>/<potential>.jsonl` where `<key>` is the shard set's manifest hash (or a
  sha256 of the input files). Only the structures whose chemical system lies inside one of the
  evaluated systems are relaxed, on demand; the file grows across runs and a killed run loses
  nothing (lines are appended as they finish);
* elemental references (`CACHE/elemental/<potential>.json`): for each element, the lowest energy per
  atom among fcc, bcc, hcp, diamond and simple cubic cells (plus a dimer in a box for the diatomic
  gases), each relaxed with the potential. This is the built-in fallback; a downloaded set replaces
  it: `load_elemental_entries(path)` reads pymatgen `ComputedEntry` dicts (a list, or a dict keyed
  by element, json or json.gz - e.g. Matbench Discovery's `mp_elemental_reference_entries.json.gz`),
  usable when their energies are on the potential's scale (CHGNet is fitted to Materials Project
  energies with MP2020 corrections, so MP entries are close but not identical).

Phase diagrams are built per chemical system (pymatgen `PhaseDiagram`) from the references whose
elements are a subset of it, and cached per system: a hull over all elements at once would be a
qhull problem in ~90 dimensions.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element, Lattice, Structure

DIATOMIC_GASES = {"H": 0.74, "N": 1.10, "O": 1.21, "F": 1.42, "Cl": 1.99, "Br": 2.28, "I": 2.67}  # Å


def default_cache_dir() -> Path:
    root = os.environ.get("XTALGEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "xtalgen"))
    return Path(root) / "evaluation"


# --- elemental references ----------------------------------------------------------------------
def elemental_prototypes(symbol: str) -> dict[str, tuple[Structure, bool]]:
    """Candidate cells of one element: name -> (structure, relax the cell?). Sizes from the
    element's radius; relaxation sets the real lattice constant."""
    if symbol in DIATOMIC_GASES:
        # The reference state is the molecule. Solid prototypes of these elements are not
        # meaningful, and their cell relaxations run away.
        box = 10.0  # Å: images beyond the potential's cutoff, so the molecule is isolated
        bond = DIATOMIC_GASES[symbol] / box
        dimer = Structure(Lattice.cubic(box), [symbol] * 2, [[0.5 - bond / 2, 0.5, 0.5], [0.5 + bond / 2, 0.5, 0.5]])
        return {"dimer": (dimer, False)}
    element = Element(symbol)
    radius = float(element.atomic_radius or element.atomic_radius_calculated or 1.5)
    candidates = {
        "fcc": Structure(Lattice.cubic(2 * np.sqrt(2) * radius), [symbol] * 4,
                         [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]),
        "bcc": Structure(Lattice.cubic(4 * radius / np.sqrt(3)), [symbol] * 2, [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "hcp": Structure(Lattice.hexagonal(2 * radius, 2 * radius * np.sqrt(8 / 3)), [symbol] * 2,
                         [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]]),
        "diamond": Structure(Lattice.cubic(8 * radius / np.sqrt(3)), [symbol] * 8,
                             [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                              [0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]]),
        "sc": Structure(Lattice.cubic(2 * radius), [symbol], [[0, 0, 0]]),
    }
    # Primitive cells: fewer atoms, same energy per atom, cheaper relaxations.
    return {name: (s.get_primitive_structure(), True) for name, s in candidates.items()}


def compute_elemental_references(
    elements: Iterable[str],
    potential,
    cache_dir: str | Path | None = None,
    *,
    fmax: float = 0.05,
    steps: int = 300,
    workers: int = 1,
    batch: int = 8,
    progress: bool = False,
) -> dict[str, dict]:
    """{symbol: {"energy_per_atom", "prototype"}} for `elements`, computing only what the cache
    (`cache_dir/elemental/<potential>.json`) lacks; an element is saved as soon as all of its
    candidates are done. Cell relaxations go through `relax_many` (batched; a process pool when
    `workers > 1`), the molecules in a box one by one with the cell fixed."""
    from xtalgen.evaluation.relax import relax_many

    path = Path(cache_dir or default_cache_dir()) / "elemental" / f"{potential.name}.json"
    cache: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    missing = sorted(set(elements) - set(cache))
    if not missing:
        return {s: cache[s] for s in elements if s in cache}
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    candidates = [  # (symbol, prototype name, structure, relax the cell?)
        (symbol, name, structure, relax_cell)
        for symbol in missing
        for name, (structure, relax_cell) in elemental_prototypes(symbol).items()
    ]
    remaining = Counter(symbol for symbol, *_ in candidates)
    best: dict[str, dict] = {}
    bar = tqdm(total=len(candidates), desc="elemental references", disable=not progress)

    def record(k: int, result) -> None:
        symbol, name = candidates[k][:2]
        energy = result.energy_per_atom if result is not None else float("nan")
        if np.isfinite(energy) and (symbol not in best or energy < best[symbol]["energy_per_atom"]):
            best[symbol] = {"energy_per_atom": energy, "prototype": name}
        remaining[symbol] -= 1
        if remaining[symbol] == 0 and symbol in best:
            cache[symbol] = best[symbol]
            _write_json_atomic(path, cache)
        bar.update()

    cells = [(k, c[2]) for k, c in enumerate(candidates) if c[3]]
    target = potential.name if workers > 1 else potential
    for k, result, _error in relax_many(cells, target, workers=workers, fmax=fmax, steps=steps, batch=batch):
        record(k, result)  # a prototype the potential cannot handle is just not a candidate
    for k, (_, _, structure, relax_cell) in enumerate(candidates):
        if relax_cell:
            continue
        try:
            record(k, potential.relax(structure, fmax=fmax, steps=steps, relax_cell=False))
        except Exception:  # as above
            record(k, None)
    bar.close()
    return {s: cache[s] for s in elements if s in cache}


def load_elemental_entries(path: str | Path) -> dict[str, float]:
    """Lowest energy per atom by element from pymatgen ComputedEntry dicts (json / json.gz)."""
    from pymatgen.entries.computed_entries import ComputedEntry

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    items = data.values() if isinstance(data, dict) else data
    best: dict[str, float] = {}
    for item in items:
        entry = ComputedEntry.from_dict(item)
        if len(entry.composition.elements) != 1:
            continue
        symbol = entry.composition.elements[0].symbol
        best[symbol] = min(best.get(symbol, np.inf), entry.energy_per_atom)
    return best


# --- reference energies of training structures ------------------------------------------------
def reference_key(source: str | Path) -> str:
    """Identity of a reference set: the manifest hash for a shard set, else sha256 of the file(s)."""
    path = Path(source)
    if (path / "manifest.json").exists():
        from xtalgen.sharding import manifest_hash

        return manifest_hash(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class ReferenceEnergyStore:
    """Append-only JSONL of reference energies: {"id", "composition", "energy_per_atom"} per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.exists():
            return rows
        with open(self.path) as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: recomputed next time
                    continue
                rows[row["id"]] = row
        return rows

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# --- the hull -----------------------------------------------------------------------------------
class ConvexHullReference:
    """Energies above the hull of a set of (composition, energy per atom) references."""

    def __init__(self, compositions: Sequence[Composition], energies_per_atom: Sequence[float]):
        self._by_system: dict[frozenset[str], list[PDEntry]] = {}
        for composition, energy in zip(compositions, energies_per_atom):
            if not np.isfinite(energy):
                continue
            composition = Composition(composition)
            entry = PDEntry(composition, float(energy) * composition.num_atoms)
            system = frozenset(el.symbol for el in composition.elements)
            self._by_system.setdefault(system, []).append(entry)
        self._diagram = lru_cache(maxsize=4096)(self._build_diagram)
        self.elements: set[str] = {next(iter(s)) for s in self._by_system if len(s) == 1}

    def _build_diagram(self, system: frozenset[str]) -> PhaseDiagram:
        entries = []
        for size in range(1, len(system) + 1):
            for subset in itertools.combinations(sorted(system), size):
                entries.extend(self._by_system.get(frozenset(subset), []))
        return PhaseDiagram(entries)

    def e_above_hull(self, composition: Composition, energy_per_atom: float) -> float:
        """eV/atom above the hull; negative when below it. NaN when an element has no reference."""
        composition = Composition(composition)
        system = frozenset(el.symbol for el in composition.elements)
        if not system <= self.elements or not np.isfinite(energy_per_atom):
            return float("nan")
        diagram = self._diagram(system)
        entry = PDEntry(composition, float(energy_per_atom) * composition.num_atoms)
        _, e_hull = diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
        return float(e_hull)

    def formation_energy_per_atom(self, composition: Composition, energy_per_atom: float) -> float:
        composition = Composition(composition)
        system = frozenset(el.symbol for el in composition.elements)
        if not system <= self.elements:
            return float("nan")
        entry = PDEntry(composition, float(energy_per_atom) * composition.num_atoms)
        return float(self._diagram(system).get_form_energy_per_atom(entry))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# --- a hull file of published entries (e.g. `xtalgen data download mp_hull`) ------------------------
GGA_RUN_TYPES = frozenset({"GGA", "GGA+U"})  # the footing of MP2020-corrected energies (and CHGNet's)


def iter_entry_dicts(path: str | Path) -> Iterator[dict]:
    """ComputedEntry / ComputedStructureEntry dicts from a JSON file (json or json.gz), streamed.

    Layouts: a list of entry dicts; a dict whose values are entry dicts (e.g. keyed by element);
    a pandas `to_json` frame with an `entry` column (Matbench Discovery's
    `2023-02-07-mp-computed-structure-entries.json.gz`); JSON lines (.jsonl / .jsonl.gz), one
    entry per line. The file is read incrementally (one entry at a time): never `json.load` of a
    whole multi-gigabyte text, and never pickle.
    """
    path = Path(path)
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        if name.removesuffix(".gz").endswith(".jsonl"):
            for line in handle:
                if line.strip():
                    yield from _entries_in(json.loads(line))
            return
        yield from _stream_entries(_JSONStream(handle))


def _is_entry(value) -> bool:
    return isinstance(value, dict) and "energy" in value and "composition" in value


def _entries_in(value) -> Iterator[dict]:
    if _is_entry(value):
        yield value
    elif isinstance(value, list):
        yield from (v for v in value if _is_entry(v))


class _JSONStream:
    """Incremental reader of one JSON document: containers are walked, values decoded one by one."""

    def __init__(self, handle, chunk: int = 1 << 20):
        self.handle, self.chunk = handle, chunk
        self.buffer, self.pos, self.eof = "", 0, False
        self.decoder = json.JSONDecoder()

    def _fill(self) -> bool:
        data = self.handle.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buffer = self.buffer[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._fill():
                return ""

    def take(self, char: str) -> None:
        found = self.peek()
        if found != char:
            raise ValueError(f"malformed JSON: expected {char!r}, found {found!r}")
        self.pos += 1

    def value(self):
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError:
                if not self._fill():
                    raise
                continue
            if end == len(self.buffer) and not self.eof and self._fill():
                continue  # a number may go on in the next chunk: decode again
            self.pos = end
            return value

    def items(self, closing: str) -> Iterator[str | None]:
        """Walk the members of the container just opened: yields each key (None in an array),
        with the stream positioned at the member's value."""
        while self.peek() != closing:
            key = None
            if closing == "}":
                key = self.value()
                self.take(":")
            yield key
            if self.peek() == ",":
                self.take(",")
        self.take(closing)


def _stream_entries(stream: _JSONStream) -> Iterator[dict]:
    opening = stream.peek()
    if opening not in "[{" or not opening:
        raise ValueError("a hull file holds a JSON list or object of entries")
    stream.take(opening)
    for key in stream.items("]" if opening == "[" else "}"):
        if key in ("entry", "entries") and stream.peek() in "[{":  # a pandas column of entries
            inner = stream.peek()
            stream.take(inner)
            for _ in stream.items("]" if inner == "[" else "}"):
                yield from _entries_in(stream.value())
        else:
            yield from _entries_in(stream.value())


def hull_entry_row(data: dict) -> dict | None:
    """{"id", "composition", "energy_per_atom"} of one entry dict; None for an entry of another
    functional (e.g. r2SCAN: its energies are on another scale than GGA/GGA+U).

    The energy is the entry's corrected energy (`ComputedEntry.energy`: the DFT energy plus its
    `energy_adjustments`, which for Materials Project entries are the MP2020 corrections).
    """
    from pymatgen.entries.computed_entries import ComputedEntry

    run_type = (data.get("parameters") or {}).get("run_type") or (data.get("data") or {}).get("run_type")
    if run_type is not None and str(run_type) not in GGA_RUN_TYPES:
        return None
    slim = {k: v for k, v in data.items() if k != "structure"}  # no Structure needed for the hull
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about noble gases' electronegativity
        entry = ComputedEntry.from_dict(slim)
    if not np.isfinite(entry.energy_per_atom):
        return None
    return {
        "id": str(entry.entry_id),
        "composition": {el.symbol: float(amount) for el, amount in entry.composition.items()},
        "energy_per_atom": float(entry.energy_per_atom),
    }


@dataclass
class HullFile:
    """A hull file and its rows (`load_hull_entries`), loaded once and reused."""

    path: str
    rows: list[dict]

    @classmethod
    def load(cls, path: str | Path, cache_dir: str | Path | None = None, progress: bool = False) -> HullFile:
        return cls(str(path), load_hull_entries(path, cache_dir, progress))


def load_hull_entries(path: str | Path, cache_dir: str | Path | None = None, progress: bool = False) -> list[dict]:
    """The hull rows of a hull file (see `hull_entry_row`). The first read of a file writes a compact
    copy (`cache_dir/hull/<sha256>.jsonl.gz`, no structures) that later reads use."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.lower().endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")))
        if len(files) != 1:
            raise ValueError(f"{path}: expected one .json/.json.gz hull file in the folder, found {len(files)}")
        path = files[0]
    if not path.exists():
        raise FileNotFoundError(f"hull file {path} does not exist")
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / "hull" / f"{_file_sha256(path)}.jsonl.gz"
        if cache.exists():
            with gzip.open(cache, "rt") as handle:
                return [json.loads(line) for line in handle]
    from tqdm.auto import tqdm

    rows = []
    try:
        for data in tqdm(iter_entry_dicts(path), desc="reading hull entries", disable=not progress, unit="entry"):
            row = hull_entry_row(data)
            if row is not None:
                rows.append(row)
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile, KeyError) as exc:
        raise ValueError(f"{path}: not a JSON file of ComputedEntry dicts ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise ValueError(f"{path}: no GGA/GGA+U ComputedEntry dicts found")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        with gzip.open(tmp, "wt") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        os.replace(tmp, cache)
    return rows


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
