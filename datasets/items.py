"""The two things that travel from the readers to the workers: a `RawItem` or a `Rejection`.

They live here, apart from `readers`, `builtin` and `validation`, which all make or take them, so
that those modules import this one and not each other (an import-linter contract keeps it so).
This module imports nothing from xtalgen.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RawItem:
    """One input structure as read, not yet parsed (see `xtalgen.datasets.readers`)."""

    source: str  # "path/to/file.csv:row 17", "x.zip:foo.cif", "builtin:aflow:12" (for reports)
    index: int  # position in the global input order (0, 1, 2, ... across all inputs)
    id: str | None  # record id if the input has one (CSV material_id, file stem, ...)
    kind: str  # "cif" | "atoms_dict" | "extxyz"
    payload: object  # CIF text, extxyz frame text, or a plain dict of arrays/lists
    properties: dict = field(default_factory=dict)  # raw values of mapped property columns
    split: str | None = None  # "train"/"val"/"test" when the input file is named so


@dataclass(frozen=True)
class Rejection:
    """Why an input (one item, or a whole unreadable file) gives no record."""

    id: str
    source: str
    reason: str  # a key of xtalgen.datasets.validation.REASON_CODES
    detail: str
