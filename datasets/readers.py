"""Streaming readers: turn input files into `RawItem`s, cheaply and in a fixed global order.

Readers only split inputs into items (one CIF text, one extxyz frame, one database row); parsing
and validation happen later, in worker processes (`xtalgen.datasets.validation`). Nothing here
loads a whole file: CSVs are read row by row with the csv module, zips member by member, extxyz
frame by frame, ASE databases row by row.

Supported inputs:
  *.csv                 a `cif` column (MP-20 / Alex-MP-20 / Perov-5 / Carbon-24 layout; the first
                        column may be an unnamed pandas index)
  *.cif                 one structure per file
  folder                every supported file inside, recursively, in sorted order (hidden files
                        and folders, such as downloaded archives in .downloads/, are skipped)
  *.zip                 CIF and CSV members, in sorted order
  *.extxyz, *.xyz       extended XYZ, one item per frame
  *.db                  ASE database, one item per row
  builtin:aflow         the AFLOW prototype structures bundled with pymatgen (works offline)

A file that cannot be read yields one `Rejection(reason="unreadable_file")`; a bad row becomes a
bad item (rejected later) and never stops the rows after it.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from xtalgen.datasets.builtin import iter_builtin
from xtalgen.datasets.items import RawItem, Rejection
from xtalgen.datasets.properties import property_columns
from xtalgen.datasets.validation import printable
from xtalgen.schema.data import ReaderConfig

SPLIT_NAMES = ("train", "val", "test")
CSV_SUFFIXES = (".csv",)
CIF_SUFFIXES = (".cif",)
XYZ_SUFFIXES = (".extxyz", ".xyz")
DB_SUFFIXES = (".db",)
ZIP_SUFFIXES = (".zip",)
SUPPORTED_SUFFIXES = CSV_SUFFIXES + CIF_SUFFIXES + XYZ_SUFFIXES + DB_SUFFIXES + ZIP_SUFFIXES
BUILTIN_PREFIX = "builtin:"

# CIF texts in a CSV cell can be long; the csv module's default 128 kB field limit is too small
# for large cells.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def split_from_name(path: str | Path) -> str | None:
    """`train.csv` -> "train"; the split an input's file name declares, if any."""
    stem = Path(str(path)).stem.lower()
    return stem if stem in SPLIT_NAMES else None


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Inputs with folders replaced by the supported files inside them (sorted, recursive)."""
    expanded: list[str] = []
    for name in inputs:
        name = str(name)
        if name.startswith(BUILTIN_PREFIX) or not os.path.isdir(name):
            expanded.append(name)
            continue
        root = Path(name)
        files = sorted(
            str(p) for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)  # hidden: skipped
        )
        expanded.extend(files or [name])  # an empty folder stays, to be reported as unreadable
    return expanded


def iter_raw_items(inputs: Sequence[str], cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    """Every item of every input, in order; `index` counts all of them (rejections included)."""
    index = 0
    for name in expand_inputs(inputs):
        for item in _iter_one_input(name, cfg):
            if isinstance(item, RawItem):
                item = replace(item, index=index)
            yield item
            index += 1


def _iter_one_input(name: str, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    if name.startswith(BUILTIN_PREFIX):
        yield from iter_builtin(name, cfg)
        return
    suffix = Path(name).suffix.lower()
    readers = {
        **dict.fromkeys(CSV_SUFFIXES, iter_csv),
        **dict.fromkeys(CIF_SUFFIXES, iter_cif_file),
        **dict.fromkeys(XYZ_SUFFIXES, iter_extxyz),
        **dict.fromkeys(DB_SUFFIXES, iter_ase_db),
        **dict.fromkeys(ZIP_SUFFIXES, iter_zip),
    }
    if os.path.isdir(name):
        yield unreadable(name, f"folder holds no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
        return
    if not os.path.isfile(name):
        yield unreadable(name, "no such file or folder")
        return
    if suffix not in readers:
        yield unreadable(name, f"unsupported input type {suffix or '(no suffix)'!r}; "
                               f"expected one of {', '.join(SUPPORTED_SUFFIXES)}, a folder, or builtin:aflow")
        return
    yield from readers[suffix](name, cfg)


def unreadable(name: str, detail: str) -> Rejection:
    name, detail = printable(name), printable(detail)
    return Rejection(id=name, source=name, reason="unreadable_file", detail=detail)


def iter_structures(
    structures: Iterable, ids: Sequence[str] | None = None, properties: Sequence[dict] | None = None,
    source: str = "python", split: str | None = None,
) -> Iterator[RawItem]:
    """RawItems from pymatgen `Structure` objects given in Python (for `parse_and_validate`).

    `properties` are raw values by column name, mapped like CSV columns by `ReaderConfig`.
    """
    for k, structure in enumerate(structures):
        yield RawItem(
            source=f"{source}:{k}",
            index=k,
            id=str(ids[k]) if ids is not None else None,
            kind="atoms_dict",
            payload={
                "cell": structure.lattice.matrix.tolist(),
                "frac_coords": structure.frac_coords.tolist(),
                "symbols": [next(iter(site.species)).symbol if site.species else "X" for site in structure],
                # Several species on a site, or an occupancy below 1, is disorder.
                "occupancies": [site.species.num_atoms if len(site.species) == 1 else 0.5 for site in structure],
                "pbc": [bool(p) for p in structure.lattice.pbc],
            },
            properties=dict(properties[k]) if properties is not None else {},
            split=split,
        )


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------
def _nul_to_surrogate(lines: Iterable[str]) -> Iterator[str]:
    # The csv module aborts the whole file on a NUL byte; turn it into an unpaired surrogate so
    # only the affected row is rejected (as bad_encoding) and reading goes on.
    for line in lines:
        yield line.replace("\x00", "\udc80") if "\x00" in line else line


def iter_csv(path: str, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    try:
        handle = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        yield unreadable(path, f"{type(exc).__name__}: {exc}")
        return
    with handle:
        yield from iter_csv_stream(handle, source=path, split=split_from_name(path), cfg=cfg)


def iter_csv_stream(handle: TextIO, source: str, split: str | None, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    """Rows of an open CSV text stream; undecodable bytes must arrive as surrogates."""
    rows = csv.reader(_nul_to_surrogate(handle))
    try:
        header = next(rows)
    except StopIteration:
        yield unreadable(source, "empty file (no header row)")
        return
    except (csv.Error, OSError) as exc:
        yield unreadable(source, f"{type(exc).__name__}: {exc}")
        return
    if cfg.cif_column not in header:
        yield unreadable(source, f"no {cfg.cif_column!r} column (columns: {', '.join(header)[:200]})")
        return
    cif_at = header.index(cfg.cif_column)
    id_at = header.index(cfg.id_column) if cfg.id_column in header else None
    try:
        columns = property_columns(header, cfg)
    except ValueError as exc:
        yield unreadable(source, str(exc))
        return
    prop_at = {c.column: header.index(c.column) for c in columns}
    row_number = -1
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (csv.Error, OSError) as exc:  # malformed quoting: the rest of the file is unreliable
            yield unreadable(f"{source}:row {row_number + 1}", f"{type(exc).__name__}: {exc}; rest of file skipped")
            return
        row_number += 1
        if not row:  # csv yields [] for blank lines; they are not records
            continue
        record_id = row[id_at].strip() if id_at is not None and id_at < len(row) else ""
        yield RawItem(
            source=f"{source}:row {row_number}",
            index=-1,
            id=record_id or None,
            kind="cif",
            payload=row[cif_at] if cif_at < len(row) else "",
            properties={col: (row[at] if at < len(row) else "") for col, at in prop_at.items()},
            split=split,
        )


# --------------------------------------------------------------------------------------------
# CIF files, folders and zips
# --------------------------------------------------------------------------------------------
def _decode(data: bytes) -> str:
    # Undecodable bytes become surrogates; validation rejects them as bad_encoding.
    return data.decode("utf-8-sig", errors="surrogateescape")


def iter_cif_file(path: str, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        yield unreadable(path, f"{type(exc).__name__}: {exc}")
        return
    yield RawItem(source=path, index=-1, id=Path(path).stem, kind="cif", payload=_decode(data),
                  properties={}, split=split_from_name(Path(path).parent))


def iter_zip(path: str, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        yield unreadable(path, f"{type(exc).__name__}: {exc}")
        return
    with archive:
        members = sorted(
            info.filename for info in archive.infolist()
            if not info.is_dir() and not Path(info.filename).name.startswith(".")
            and "__MACOSX" not in info.filename
        )
        for member in members:
            suffix = Path(member).suffix.lower()
            source = f"{path}:{member}"
            try:
                if suffix in CIF_SUFFIXES:
                    data = archive.read(member)
                    yield RawItem(source=source, index=-1, id=Path(member).stem, kind="cif",
                                  payload=_decode(data), properties={},
                                  split=split_from_name(Path(member).parent))
                elif suffix in CSV_SUFFIXES:
                    with archive.open(member) as raw:
                        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
                        yield from iter_csv_stream(text, source=source, split=split_from_name(member), cfg=cfg)
            except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:  # e.g. bad CRC
                yield unreadable(source, f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------------------------
# extended XYZ
# --------------------------------------------------------------------------------------------
def iter_extxyz(path: str, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    """One item per frame. Frames are cut by their atom-count line, so one malformed frame is
    rejected on its own; ASE parses each frame inside the workers."""
    try:
        handle = open(path, encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        yield unreadable(path, f"{type(exc).__name__}: {exc}")
        return
    split = split_from_name(path)
    with handle:
        frame = 0
        line_number = 0
        for line in handle:
            line_number += 1
            if not line.strip():
                continue
            try:
                count = int(line.strip())
            except ValueError:
                yield unreadable(f"{path}:frame {frame}",
                                 f"line {line_number}: expected an atom count, got {line.strip()[:40]!r}; rest of file skipped")
                return
            body = [handle.readline() for _ in range(count + 1)]
            line_number += count + 1
            yield RawItem(source=f"{path}:frame {frame}", index=-1, id=None, kind="extxyz",
                          payload=line + "".join(body), properties={}, split=split)
            frame += 1


# --------------------------------------------------------------------------------------------
# ASE database
# --------------------------------------------------------------------------------------------
def iter_ase_db(path: str, cfg: ReaderConfig) -> Iterator[RawItem | Rejection]:
    import ase.db

    try:
        connection = ase.db.connect(path, create_indices=False, use_lock_file=False)
        rows = connection.select()
        first = next(rows, None)
    except Exception as exc:  # sqlite3/json errors for corrupt or foreign files
        yield unreadable(path, f"{type(exc).__name__}: {exc}")
        return
    split = split_from_name(path)
    current = first
    while current is not None:
        row = current
        key_values = dict(row.key_value_pairs)
        mapped = {c.column for c in property_columns(key_values, cfg)}
        record_id = key_values.get(cfg.id_column)
        yield RawItem(
            source=f"{path}:id {row.id}",
            index=-1,
            id=str(record_id) if record_id not in (None, "") else None,
            kind="atoms_dict",
            payload={"cell": row.cell.tolist(), "numbers": row.numbers.tolist(),
                     "positions": row.positions.tolist(), "pbc": [bool(p) for p in row.pbc]},
            properties={k: v for k, v in key_values.items() if k in mapped},
            split=split,
        )
        try:
            current = next(rows, None)
        except Exception as exc:
            yield unreadable(f"{path}:after id {row.id}", f"{type(exc).__name__}: {exc}; rest of file skipped")
            return
