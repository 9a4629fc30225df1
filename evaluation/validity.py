"""Structural and compositional validity of crystals (the CDVAE / MatterGen definitions).

Structural: no two atoms closer than 0.5 Å, periodic images included, and a cell volume above
0.1 Å³. Compositional: SMACT charge neutrality with the Pauling electronegativity test, exactly
as CDVAE's `smact_validity` (single elements and all-metal alloys count as valid). Elements for
which SMACT has no oxidation states or no entry at all give "unknown" instead of an exception, so
one exotic structure never stops an evaluation of thousands.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from math import gcd

import numpy as np
from pymatgen.core import Structure

VALID, INVALID, UNKNOWN = "valid", "invalid", "unknown"


@dataclass(frozen=True)
class StructuralValidity:
    valid: bool
    min_distance: float  # Å, shortest interatomic distance including periodic images
    volume: float  # Å³
    reason: str  # "" when valid


def min_interatomic_distance(structure: Structure) -> float:
    """Shortest distance between any two atoms, a site and its own images included (Å)."""
    # distance_matrix is already minimum-image between distinct sites; a site's nearest image of
    # itself is the shortest lattice vector, which the LLL-reduced basis contains.
    shortest_lattice_vector = float(np.linalg.norm(structure.lattice.lll_matrix, axis=1).min())
    if len(structure) < 2:
        return shortest_lattice_vector
    distances = structure.distance_matrix.copy()  # (N, N)
    np.fill_diagonal(distances, np.inf)
    return min(float(distances.min()), shortest_lattice_vector)


def structural_validity(
    structure: Structure, min_distance: float = 0.5, min_volume: float = 0.1
) -> StructuralValidity:
    volume = float(structure.volume)
    if not np.isfinite(volume) or volume <= min_volume:
        return StructuralValidity(False, float("nan"), volume, f"volume {volume:.3g} <= {min_volume} Å³")
    shortest = min_interatomic_distance(structure)
    if shortest < min_distance:
        return StructuralValidity(False, shortest, volume, f"atoms {shortest:.3f} Å apart < {min_distance} Å")
    return StructuralValidity(True, shortest, volume, "")


@cache
def _smact_element(symbol: str):
    """SMACT's data for one element, or None when SMACT does not know it."""
    import smact

    try:
        return smact.element_dictionary((symbol,))[symbol]
    except (KeyError, NameError, ValueError):
        return None


def compositional_validity(structure_or_counts: Structure | dict[str, int]) -> str:
    """CDVAE's SMACT test → "valid" / "invalid" / "unknown" (SMACT lacks data for an element)."""
    import smact
    from smact.screening import pauling_test

    counts = _element_counts(structure_or_counts)
    symbols = tuple(sorted(counts))
    divisor = 0
    for c in counts.values():
        divisor = gcd(divisor, int(c))
    stoichiometry = [int(counts[s]) // divisor for s in symbols]

    if len(symbols) == 1:
        return VALID
    if all(s in smact.metals for s in symbols):  # alloys are allowed, as in CDVAE
        return VALID
    elements = [_smact_element(s) for s in symbols]
    if any(e is None or not e.oxidation_states for e in elements):
        return UNKNOWN

    electronegativities = [e.pauling_eneg for e in elements]
    threshold = max(stoichiometry)
    stoichs = [(c,) for c in stoichiometry]
    for oxidation_states in itertools.product(*(e.oxidation_states for e in elements)):
        if not smact.neutral_ratios(oxidation_states, stoichs=stoichs, threshold=threshold):
            continue
        try:
            electronegativity_ok = pauling_test(oxidation_states, electronegativities)
        except TypeError:  # an element without electronegativity data passes, as in CDVAE
            electronegativity_ok = True
        if electronegativity_ok:
            return VALID
    return INVALID


def _element_counts(structure_or_counts: Structure | dict[str, int]) -> dict[str, int]:
    if isinstance(structure_or_counts, Structure):
        composition = structure_or_counts.composition
        return {el.symbol: int(round(amount)) for el, amount in composition.element_composition.items()}
    return {str(k): int(v) for k, v in structure_or_counts.items()}


def is_valid(structural: StructuralValidity, compositional: str) -> bool:
    """Overall validity: structurally valid and compositionally valid ("unknown" is not valid)."""
    return structural.valid and compositional == VALID
