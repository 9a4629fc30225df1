"""Structures to evaluate, and reference structures, from whatever the user has on disk.

* a sampling output folder (`samples.jsonl` + `cifs/`, or `samples.extxyz`): per-structure metadata
  such as `conditions` comes along;
* a folder of CIF files (searched recursively), a single CIF;
* an extxyz file (ase); a CSV with a `cif` column (MP-20 / Perov-5 / Carbon-24 layout);
* a shard set (a folder with `manifest.json`), read with `xtalgen.sharding.open_shards`.

Nothing here validates: the evaluator must see bad structures to count them. An entry that cannot
be read as a crystal yields `structure=None` with a reason code and the error, so it is reported,
not dropped. The codes are those `shard build` writes to rejects.csv (`REASON_CODES` of
`xtalgen.datasets.validation`), so one bad file reads the same in both places.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pymatgen.core import Structure

SAMPLES_JSONL = "samples.jsonl"
SAMPLES_EXTXYZ = "samples.extxyz"


@dataclass
class InputStructure:
    id: str
    structure: Structure | None
    metadata: dict = field(default_factory=dict)
    error: str = ""  # why `structure` is None (or, for an extxyz frame, what went wrong)
    reason: str = ""  # the reason code of that error, e.g. "unknown_element"


def iter_structures(path: str | Path, split: str | None = None) -> Iterator[InputStructure]:
    """Every structure at `path` (see module docstring); `split` picks a shard set's split."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if (path / "manifest.json").exists():
            yield from _iter_shards(path, split)
        elif (path / SAMPLES_JSONL).exists():
            yield from _iter_sampling_output(path)
        else:
            yield from _iter_cif_folder(path)
    elif path.suffix.lower() == ".cif":
        yield _read_cif(path.stem, path)
    elif path.suffix.lower() in (".extxyz", ".xyz"):
        yield from _iter_extxyz(path)
    elif path.suffix.lower() == ".csv":
        yield from _iter_csv(path)
    else:
        raise ValueError(f"{path}: expected a folder, .cif, .extxyz or .csv")


def non_element_species(structure: Structure) -> str | None:
    """The first species that is not a chemical element, or None.

    pymatgen reads an unknown symbol such as `Xx` as a dummy species instead of failing; it has no
    mass, so the density, the potential and the fingerprints all fail on it later."""
    from pymatgen.core.periodic_table import Element

    for specie in structure.composition:
        if not isinstance(specie, Element) and not isinstance(getattr(specie, "element", None), Element):
            return str(getattr(specie, "symbol", specie))
    return None


def _read_cif(identifier: str, path: Path, metadata: dict | None = None) -> InputStructure:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return InputStructure(identifier, None, dict(metadata or {}), f"{path.name}: {exc.strerror or exc}",
                              "unreadable_file")
    return _parse_cif(identifier, data.decode("utf-8", errors="replace"), metadata, raw=data)


def _parse_cif(identifier: str, text: str, metadata: dict | None = None, raw: bytes | None = None) -> InputStructure:
    metadata = dict(metadata or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns about rounding on most generated CIFs
            structure = Structure.from_str(text, fmt="cif")
    except Exception as exc:  # pymatgen raises many types on malformed CIFs
        return _diagnose_cif(identifier, text if raw is None else raw.decode("utf-8", "surrogateescape"),
                             metadata, exc)
    bad = non_element_species(structure)
    if bad is not None:
        return InputStructure(identifier, None, metadata, f"{bad!r} is not a chemical element", "unknown_element")
    return InputStructure(identifier, structure, metadata)


def _diagnose_cif(identifier: str, text: str, metadata: dict, exc: Exception) -> InputStructure:
    """A CIF pymatgen refused, read again by the dataset parser for a reason code.

    pymatgen merges atoms that sit on the same position and then refuses the doubled occupancy
    ("no structures"): a generated CIF with overlapping atoms would read as unparsable. The P1
    reader of `shard build` keeps every atom, so such a CIF is evaluated (and found structurally
    invalid, atoms too close) instead; anything it cannot read either gets its reason code."""
    from pymatgen.core import Lattice

    from xtalgen.datasets.validation import Reject, parse_cif

    try:
        parsed = parse_cif(text)
        structure = Structure(Lattice(parsed.lattice), [int(z) for z in parsed.atomic_numbers], parsed.frac_coords)
    except Reject as rejection:
        return InputStructure(identifier, None, metadata, rejection.detail, rejection.reason)
    except Exception:  # the dataset parser has no more to say than pymatgen
        return InputStructure(identifier, None, metadata, f"unparsable CIF: {_first_line(exc)}", "unparsable")
    return InputStructure(identifier, structure, metadata)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "") or type(exc).__name__


def _iter_cif_folder(path: Path) -> Iterator[InputStructure]:
    files = sorted(path.rglob("*.cif"))
    if not files:
        raise ValueError(f"{path} holds no CIF files, samples.jsonl or manifest.json")
    for file in files:
        yield _read_cif(str(file.relative_to(path).with_suffix("")), file)


def _iter_sampling_output(path: Path) -> Iterator[InputStructure]:
    rows = []
    for line in (path / SAMPLES_JSONL).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a partial last line of an interrupted sampling run
            continue
    frames = None
    for row in rows:
        identifier = str(row["id"])
        cif = path / (row.get("cif") or f"cifs/{identifier}.cif")
        if cif.exists():
            yield _read_cif(identifier, cif, row)
            continue
        if frames is None:
            frames = {item.id: item for item in _iter_extxyz(path / SAMPLES_EXTXYZ)} if (path / SAMPLES_EXTXYZ).exists() else {}
        found = frames.get(identifier)
        if found is None:
            yield InputStructure(identifier, None, row, "no CIF and no extxyz frame for this id")
        else:
            yield InputStructure(identifier, found.structure, row, found.error)


def _iter_extxyz(path: Path) -> Iterator[InputStructure]:
    from ase.io import iread
    from pymatgen.io.ase import AseAtomsAdaptor

    for i, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
        identifier = str(atoms.info.get("id", f"{path.stem}-{i}"))
        try:
            structure = AseAtomsAdaptor.get_structure(atoms)
        except Exception as exc:  # e.g. a frame without a cell
            yield InputStructure(identifier, None, {}, f"unusable extxyz frame: {exc}", "unparsable")
            continue
        bad = non_element_species(structure)
        if bad is not None:
            yield InputStructure(identifier, None, {}, f"{bad!r} is not a chemical element", "unknown_element")
        else:
            yield InputStructure(identifier, structure)


def _iter_csv(path: Path, chunksize: int = 2048) -> Iterator[InputStructure]:
    import pandas as pd

    for chunk in pd.read_csv(path, chunksize=chunksize):
        if "cif" not in chunk.columns:
            raise ValueError(f"{path} has no 'cif' column")
        id_column = "material_id" if "material_id" in chunk.columns else None
        for index, row in chunk.iterrows():
            identifier = str(row[id_column]) if id_column else str(index)
            yield _parse_cif(identifier, str(row["cif"]))


def _iter_shards(path: Path, split: str | None) -> Iterator[InputStructure]:
    from xtalgen.sharding import open_shards

    shards = open_shards(path)
    split = split or ("train" if "train" in shards.splits else shards.splits[0])
    for record in shards.iter_records(split):
        yield InputStructure(record.id, record.to_structure(), {"properties": dict(record.properties)})
