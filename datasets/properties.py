"""Named properties of a record: input column -> property mapping, type conversion, derived values.

MatterGen's names are the defaults. For the MP-20 / Alex-MP-20 CSV layout the columns map as

    band_gap                  -> dft_band_gap (eV)
    formation_energy_per_atom -> formation_energy_per_atom (eV/atom)
    e_above_hull              -> energy_above_hull (eV/atom)
    spacegroup.number         -> space_group (int)

and columns that already carry a MatterGen name keep it. Users add any column without code:
`data.reader.properties=[{column: dir_gap, name: dft_band_gap}]`. `chemical_system` (elements
sorted and joined by '-') and `hhi_score` (production HHI of the composition, pymatgen's table)
are computed from the structure when asked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import numpy as np

from xtalgen.record import PropertyValue
from xtalgen.schema.data import PropertyColumn, ReaderConfig

KINDS = ("float", "int", "str")

# Column name in a public CSV -> MatterGen's property name and type.
MATTERGEN_COLUMNS: dict[str, PropertyColumn] = {
    c.column: c
    for c in (
        PropertyColumn(column="band_gap", name="dft_band_gap", kind="float"),
        PropertyColumn(column="dft_band_gap", name="dft_band_gap", kind="float"),
        PropertyColumn(column="formation_energy_per_atom", name="formation_energy_per_atom", kind="float"),
        PropertyColumn(column="e_above_hull", name="energy_above_hull", kind="float"),
        PropertyColumn(column="energy_above_hull", name="energy_above_hull", kind="float"),
        PropertyColumn(column="spacegroup.number", name="space_group", kind="int"),
        PropertyColumn(column="space_group", name="space_group", kind="int"),
        PropertyColumn(column="dft_mag_density", name="dft_mag_density", kind="float"),
        PropertyColumn(column="dft_bulk_modulus", name="dft_bulk_modulus", kind="float"),
        PropertyColumn(column="dft_shear_modulus", name="dft_shear_modulus", kind="float"),
        PropertyColumn(column="ml_bulk_modulus", name="ml_bulk_modulus", kind="float"),
        PropertyColumn(column="hhi_score", name="hhi_score", kind="float"),
    )
}

_MISSING_TEXT = {"", "nan", "none", "null", "na", "n/a"}


class PropertyError(ValueError):
    """A property value that cannot be converted to its declared type."""


def property_columns(available: Iterable[str], cfg: ReaderConfig) -> list[PropertyColumn]:
    """The mapping that applies to an input with these columns, in a deterministic order.

    MatterGen defaults (when `cfg.default_properties`) for the columns present, then the user's
    entries; a user entry for the same column replaces the default.
    """
    available = list(available)
    mapping: dict[str, PropertyColumn] = {}
    if cfg.default_properties:
        for column in available:
            if column in MATTERGEN_COLUMNS:
                mapping[column] = MATTERGEN_COLUMNS[column]
    for entry in cfg.properties:  # entry.kind was checked when the config loaded (one of KINDS)
        if not entry.column or not entry.name:
            raise ValueError(f"property mapping {entry!r} needs both `column` and `name`")
        mapping[entry.column] = entry
    return [mapping[c] for c in sorted(mapping)]


def convert_value(raw: object, kind: str) -> PropertyValue | None:
    """Convert one raw cell to `kind`; None means missing. Raises PropertyError when unparseable."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        raw = int(raw)
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in _MISSING_TEXT:
            return None
    else:
        text = None
    if kind == "str":
        return text if text is not None else str(raw)
    try:
        number = float(text if text is not None else raw)
    except (TypeError, ValueError):
        raise PropertyError(f"{raw!r} is not a number") from None
    if math.isnan(number):
        return None
    if not math.isfinite(number):
        raise PropertyError(f"{raw!r} is not finite")
    if kind == "float":
        return number
    if number != int(number):
        raise PropertyError(f"{raw!r} is not an integer")
    return int(number)


def convert_properties(raw: Mapping[str, object], cfg: ReaderConfig) -> dict[str, PropertyValue]:
    """Raw column values -> {property name: typed value}; missing values are left out."""
    out: dict[str, PropertyValue] = {}
    for entry in property_columns(raw.keys(), cfg):
        try:
            value = convert_value(raw.get(entry.column), entry.kind)
        except PropertyError as exc:
            raise PropertyError(f"column {entry.column!r} ({entry.name}, {entry.kind}): {exc}") from None
        if value is not None:
            out[entry.name] = value
    return out


@lru_cache(maxsize=1)
def _symbols() -> dict[int, str]:
    from pymatgen.core.periodic_table import Element

    return {int(el.Z): el.symbol for el in Element}


def chemical_system(atomic_numbers: Sequence[int] | np.ndarray) -> str:
    """Elements sorted alphabetically and joined by '-' (pymatgen's convention), e.g. 'O-Sr-Ti'."""
    symbols = _symbols()
    return "-".join(sorted({symbols[int(z)] for z in set(np.asarray(atomic_numbers).tolist())}))


@lru_cache(maxsize=1)
def _hhi_model():
    from pymatgen.analysis.hhi import HHIModel

    return HHIModel()


def hhi_score(atomic_numbers: Sequence[int] | np.ndarray) -> float | None:
    """Production Herfindahl-Hirschman index of the composition (mass-weighted, pymatgen's table).

    None when an element has no tabulated value.
    """
    from pymatgen.core import Composition
    from pymatgen.core.periodic_table import Element

    zs, counts = np.unique(np.asarray(atomic_numbers, dtype=np.int64), return_counts=True)
    composition = Composition({Element.from_Z(int(z)): int(n) for z, n in zip(zs, counts)})
    try:
        value = _hhi_model().get_hhi_production(composition)
    except (KeyError, TypeError):
        return None
    return None if value is None or not math.isfinite(value) else float(value)


SPACE_GROUP_SYMPREC = 0.1  # Å, the evaluator's tolerance (EvaluateConfig.symprec)


def space_group_number(lattice: np.ndarray, frac_coords: np.ndarray, atomic_numbers: np.ndarray) -> int | None:
    """International space-group number by spglib (symprec 0.1 Å); None when spglib finds none."""
    import spglib

    dataset = spglib.get_symmetry_dataset((lattice, frac_coords, atomic_numbers), symprec=SPACE_GROUP_SYMPREC)
    return int(dataset.number) if dataset is not None else None


def derived_properties(atomic_numbers: np.ndarray, cfg: ReaderConfig, lattice: np.ndarray | None = None,
                       frac_coords: np.ndarray | None = None) -> dict[str, PropertyValue]:
    """Properties computed from the structure itself, as configured (the space group needs the
    lattice and coordinates too)."""
    out: dict[str, PropertyValue] = {}
    if cfg.compute_space_group and lattice is not None and frac_coords is not None:
        number = space_group_number(lattice, frac_coords, atomic_numbers)
        if number is not None:
            out["space_group"] = number
    if cfg.chemical_system:
        out["chemical_system"] = chemical_system(atomic_numbers)
    if cfg.compute_hhi:
        value = hhi_score(atomic_numbers)
        if value is not None:
            out["hhi_score"] = value
    return out
