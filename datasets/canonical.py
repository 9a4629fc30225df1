"""Canonical form of a crystal: Niggli-reduced lattice in a standard orientation, wrapped
coordinates, atoms sorted by element then position.

The same structure given with atoms in another order, or rotated in Cartesian space, gives the
same arrays (to float precision); given in another unit cell of the same lattice it gives the same
Niggli metric (cell lengths and angles). Cells whose Niggli cell is not unique (equal lengths,
right angles: e.g. cubic) may still differ by a symmetry of the lattice, which is harmless: the
structure is the same (StructureMatcher says equal).
"""

from __future__ import annotations

import hashlib

import numpy as np
import spglib

NIGGLI_TOLERANCE = 1e-5  # spglib's and pymatgen's default tolerance of the reduction conditions


def wrap_fractional(frac: np.ndarray) -> np.ndarray:
    """Wrap fractional coordinates into [0, 1), strictly below 1.

    `x - floor(x)` is not enough: for x = -1e-17 it gives 1 - 1e-17, which rounds to exactly 1.0.
    Those values are the same point as 0.0, so they are mapped there. Adding 0.0 turns -0.0 into
    +0.0 so equal coordinates are also equal bytes.
    """
    wrapped = frac - np.floor(frac)  # (N, 3) in [0, 1]
    wrapped[wrapped >= 1.0] = 0.0
    return wrapped + 0.0


def niggli_reduce(
    lattice: np.ndarray, frac_coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Niggli-reduce the cell and express the same Cartesian positions in the new cell.

    Returns (lattice (3, 3), frac_coords (N, 3)) with coordinates wrapped into [0, 1).
    Raises ValueError when the cell cannot be reduced (degenerate).

    spglib's C implementation (Grosse-Kunstleve et al. 2004, the algorithm pymatgen also uses) is
    ~60x faster than pymatgen's `get_niggli_reduced_lattice`, whose search for the matching
    lattice vectors dominated the cost of building large shard sets.
    """
    reduced = spglib.niggli_reduce(np.ascontiguousarray(lattice), eps=NIGGLI_TOLERANCE)
    if reduced is None:
        raise ValueError("spglib could not Niggli-reduce the cell")
    reduced = np.array(reduced, dtype=np.float64)  # (3, 3)
    if np.linalg.det(reduced) < 0:
        # (-a, -b, -c) has the same metric, so it is as Niggli-reduced, and it keeps the input's
        # right-handedness.
        reduced = -reduced
    cart = frac_coords @ lattice  # (N, 3)
    # Solve instead of inverting: new_frac @ reduced = cart.
    new_frac = np.linalg.solve(reduced.T, cart.T).T  # (N, 3)
    # The reduced basis is an integer recombination of the old one, so fractional coordinates
    # that were exact lattice positions come back within ~1e-15 of an integer; rounding those to
    # the integer removes the noise that would otherwise make 0.0 appear as 0.9999999999999999.
    nearest = np.round(new_frac)
    snap = np.abs(new_frac - nearest) < 1e-12
    new_frac[snap] = nearest[snap]
    return np.ascontiguousarray(reduced), wrap_fractional(new_frac)


SORT_DECIMALS = 6  # coordinates equal to 1e-6 sort as equal (then by input order: stable)


def sort_atoms(frac_coords: np.ndarray, atomic_numbers: np.ndarray) -> np.ndarray:
    """Deterministic atom order: by atomic number, then x, y, z (stable). Returns the permutation.

    The key is the coordinate rounded to 1e-6 (and 0.9999999 counted as 0), so that the order does
    not flip with float noise between two descriptions of the same structure (a CIF and the extxyz
    written from it). The coordinates themselves are not rounded.
    """
    key = np.round(frac_coords, SORT_DECIMALS) % 1.0  # (N, 3)
    return np.lexsort((key[:, 2], key[:, 1], key[:, 0], atomic_numbers))


def standard_orientation(lattice: np.ndarray) -> np.ndarray:
    """The same cell rotated so that a lies along x and b in the xy plane (lower triangular).

    It is the Cholesky factor of the metric `lattice @ lattice.T`: a function of the cell's
    lengths and angles only, so any rotated copy of a cell gives the same matrix, and, for a
    right-handed cell, a pure rotation of it (fractional coordinates are unchanged).
    """
    return np.linalg.cholesky(lattice @ lattice.T) + 0.0  # (3, 3)


def canonicalize(
    lattice: np.ndarray, frac_coords: np.ndarray, atomic_numbers: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Niggli-reduced lattice (3, 3), wrapped sorted coordinates (N, 3), matching numbers (N,)."""
    lattice = np.asarray(lattice, dtype=np.float64).reshape(3, 3)
    frac_coords = np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3)
    atomic_numbers = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    reduced, frac = niggli_reduce(lattice, frac_coords)
    order = sort_atoms(frac, atomic_numbers)
    return (standard_orientation(reduced), np.ascontiguousarray(frac[order]),
            np.ascontiguousarray(atomic_numbers[order]))


def derive_id(source: str) -> str:
    """A stable id for an input that has none: its source, which names file and position.

    Sources are built from the paths as given, so the same command gives the same ids. Very long
    sources are shortened with a hash so ids stay readable.
    """
    if len(source) <= 120:
        return source
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{source[:100]}~{digest}"
