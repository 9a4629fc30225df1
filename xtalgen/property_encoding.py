"""How property values become the arrays a batch carries: the one encoding for loaders, `collate`
and sampling conditions.

Per structure a property is a number or a chemical system. A column of B values becomes

* ints only (space group, categorical code)  -> (B,) int64
* numbers                                   -> (B,) float64
* chemical systems ("Co-Li-O")              -> (B, 100) float64 multi-hot over Z = 1..100 (column Z-1)

plus a (B,) bool mask of the structures that carry it (absent: None or NaN; their rows are 0).
Written once here because the loader, `xtalgen.batch.collate` and `xtalgen sample --condition`
must agree bit for bit on what the score network reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase.data import atomic_numbers as _ATOMIC_NUMBERS

from xtalgen.record import MAX_ATOMIC_NUMBER


def has_value(value: Any) -> bool:
    """A property counts as present unless it is None or a float NaN."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def chemical_system_columns(system: str) -> list[int]:
    """'Co-Li-O' -> the multi-hot columns [26, 2, 7] (Z - 1). ValueError names a bad symbol."""
    symbols = [s.strip() for s in system.replace(",", "-").split("-") if s.strip()]
    if not symbols:
        raise ValueError(f"{system!r} names no element")
    columns = []
    for symbol in symbols:
        z = _ATOMIC_NUMBERS.get(symbol, 0) if symbol[:1].isupper() else 0
        if not 1 <= z <= MAX_ATOMIC_NUMBER:
            raise ValueError(f"{symbol!r} in {system!r} is not an element symbol of Z = 1..{MAX_ATOMIC_NUMBER}")
        columns.append(z - 1)
    return columns


def canonical_chemical_system(system: str) -> str:
    """'O-Li-Co' -> 'Co-Li-O': distinct symbols sorted and joined by '-' (pymatgen's convention)."""
    chemical_system_columns(system)  # validates
    symbols = {s.strip() for s in system.replace(",", "-").split("-") if s.strip()}
    return "-".join(sorted(symbols))


def chemical_system_multi_hot(system: str) -> np.ndarray:
    """(100,) float64 multi-hot of a chemical system."""
    hot = np.zeros(MAX_ATOMIC_NUMBER, dtype=np.float64)
    hot[chemical_system_columns(system)] = 1.0
    return hot


def encode_column(values: Sequence[Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(array, (B,) bool mask) for one property over a batch; see the module docstring."""
    mask = np.array([has_value(v) for v in values], dtype=bool)
    present = [v for v, m in zip(values, mask) if m]
    if present and all(isinstance(v, str) for v in present):
        column = np.zeros((len(values), MAX_ATOMIC_NUMBER), dtype=np.float64)
        for row, (value, keep) in enumerate(zip(values, mask)):
            if keep:
                try:
                    column[row, chemical_system_columns(value)] = 1.0
                except ValueError as exc:
                    raise ValueError(f"property {name!r}: {exc}; expected a number or a chemical "
                                     "system like 'Co-Li-O'") from None
        return column, mask
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return np.array([int(v) if m else 0 for v, m in zip(values, mask)], dtype=np.int64), mask
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([float(v) if m else 0.0 for v, m in zip(values, mask)], dtype=np.float64), mask
    kinds = sorted({type(v).__name__ for v in present})
    raise ValueError(f"property {name!r} mixes value types {kinds}; expected numbers or chemical systems")
