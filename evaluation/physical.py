"""Is a cell physical? Volume per atom against a band, and the guard that stops runaway relaxations.

A generated crystal whose cell is blown up (hundreds or millions of Å³ per atom: atoms hundreds of
Å apart, no bonds) passes the CDVAE structural test, since no two atoms are too close. Such a cell is
not a crystal, so the evaluator flags it:

* `physical_cell`: volume per atom inside a band. The band is the reference (training) set's
  range of volume per atom, widened by `REFERENCE_BAND_MARGIN` on both sides, when a reference is
  given; otherwise `DEFAULT_VOLUME_PER_ATOM_BAND` (5-60 Å³/atom: the densest solids are near 5,
  e.g. diamond 5.7, and almost every inorganic crystal in the Materials Project lies below 60).
  A cell outside the band is not structurally valid and is never relaxed (reason
  `NON_PHYSICAL_CELL`).
* `check_relaxation_volume`: the relaxation guard. A relaxation whose cell grows or shrinks by more
  than `RUNAWAY_VOLUME_FACTOR` in volume per atom from where it started is stopped ("relaxation ran
  away"): the potential's neighbour graph, and its memory, would otherwise grow without bound. It
  judges what the relaxation did, not the cell it was given.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

DEFAULT_VOLUME_PER_ATOM_BAND = (5.0, 60.0)  # Å³ per atom, used when no reference set is given
REFERENCE_BAND_MARGIN = 0.2  # a reference's [min, max] becomes [min * 0.8, max * 1.2]
RUNAWAY_VOLUME_FACTOR = 4.0  # a relaxation may change the volume per atom by at most x4 or /4
NON_PHYSICAL_CELL = "non-physical cell"


class RelaxationRunaway(RuntimeError):
    """The cell's volume ran away during a relaxation."""


def volume_per_atom(structure) -> float:
    """Å³ per atom of a pymatgen Structure (or of anything with `volume` and a length)."""
    n = len(structure)
    return float(structure.volume) / n if n else float("nan")


def in_band(value: float, band: tuple[float, float]) -> bool:
    return math.isfinite(value) and band[0] <= value <= band[1]


def describe_band(band: tuple[float, float]) -> str:
    return f"[{band[0]:.3g}, {band[1]:.3g}] Å³/atom"


def non_physical_reason(value: float, band: tuple[float, float]) -> str:
    return f"{NON_PHYSICAL_CELL}: {value:.3g} Å³/atom outside {describe_band(band)}"


def band_from_values(values: Iterable[float], margin: float = REFERENCE_BAND_MARGIN) -> tuple[float, float] | None:
    """[min * (1 - margin), max * (1 + margin)] of finite positive values; None when there are none."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if not finite:
        return None
    return (min(finite) * (1 - margin), max(finite) * (1 + margin))


def reference_volume_band(reference, cache_dir: str | Path | None = None) -> tuple[float, float] | None:
    """The band of a reference: a path (shard set, CSV, CIF folder, extxyz; cached by content under
    `cache_dir/volume_band/`) or a list of Structures / CrystalRecords / InputStructures."""
    if reference is None:
        return None
    if not isinstance(reference, (str, os.PathLike)):
        return band_from_values(_values_of_list(reference))
    from xtalgen.evaluation.hull import reference_key

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / "volume_band" / f"{reference_key(reference)}.json"
        if cache.exists():
            data = json.loads(cache.read_text())
            return (data["low"], data["high"]) if data.get("low") is not None else None
    band = band_from_values(_values_of_path(Path(reference)))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"low": band[0] if band else None, "high": band[1] if band else None,
                                   "margin": REFERENCE_BAND_MARGIN}))
        os.replace(tmp, cache)
    return band


def _values_of_list(reference) -> Iterable[float]:
    from xtalgen.record import CrystalRecord

    for item in reference:
        structure = getattr(item, "structure", item)  # InputStructure, Structure or CrystalRecord
        if isinstance(structure, CrystalRecord):
            yield structure.volume / structure.num_atoms
        elif structure is not None:
            yield volume_per_atom(structure)


def _values_of_path(path: Path) -> Iterable[float]:
    if (path / "manifest.json").exists():  # a shard set: records carry the lattice, no CIF parsing
        from xtalgen.sharding import open_shards

        shards = open_shards(path)
        for split in shards.splits:
            for record in shards.iter_records(split):
                yield record.volume / record.num_atoms
        return
    from xtalgen.evaluation.inputs import iter_structures

    for item in iter_structures(path):
        if item.structure is not None:
            yield volume_per_atom(item.structure)


def check_relaxation_volume(start_volume_per_atom: float, current_volume_per_atom: float,
                            factor: float | None = None) -> None:
    """Raise RelaxationRunaway when the volume per atom left [start / factor, start * factor]
    (factor: `RUNAWAY_VOLUME_FACTOR` by default)."""
    factor = RUNAWAY_VOLUME_FACTOR if factor is None else factor
    ratio = current_volume_per_atom / start_volume_per_atom
    if not (math.isfinite(ratio) and 1 / factor <= ratio <= factor):
        raise RelaxationRunaway(
            f"relaxation ran away: volume went from {start_volume_per_atom:.3g} to "
            f"{current_volume_per_atom:.3g} Å³ per atom (x{ratio:.3g}; the limit is x{factor:g} either way)"
        )
