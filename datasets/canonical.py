"""Canonical form of a crystal: Niggli-reduced lattice, wrapped coordinates, sorted atoms.

Two inputs that describe the same periodic structure in the same setting give the same arrays
bit-for-bit, whatever the order of the atoms or the choice of unit-cell vectors (up to the Niggli
tolerance), so shards built from them are byte-identical and duplicates are easy to spot.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pymatgen.core import Lattice

NIGGLI_TOLERANCE = 1e-5  # pymatgen's default: relative tolerance of the reduction conditions


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
    Raises ValueError when pymatgen cannot reduce the cell (degenerate or extremely skewed).
    """
    reduced = Lattice(lattice).get_niggli_reduced_lattice(tol=NIGGLI_TOLERANCE).matrix  # (3, 3)
    cart = frac_coords @ lattice  # (N, 3)
    # Solve instead of inverting: new_frac @ reduced = cart.
    new_frac = np.linalg.solve(reduced.T, cart.T).T  # (N, 3)
    # The reduced basis is an integer recombination of the old one, so fractional coordinates
    # that were exact lattice positions come back within ~1e-15 of an integer; rounding those to
    # the integer removes the noise that would otherwise make 0.0 appear as 0.9999999999999999.
    nearest = np.round(new_frac)
    snap = np.abs(new_frac - nearest) < 1e-12
    new_frac[snap] = nearest[snap]
    return np.ascontiguousarray(reduced, dtype=np.float64), wrap_fractional(new_frac)


SORT_DECIMALS = 6  # coordinates equal to 1e-6 sort as equal (then by input order: stable)


def sort_atoms(frac_coords: np.ndarray, atomic_numbers: np.ndarray) -> np.ndarray:
    """Deterministic atom order: by atomic number, then x, y, z (stable). Returns the permutation.

    The key is the coordinate rounded to 1e-6 (and 0.9999999 counted as 0), so that the order does
    not flip with float noise between two descriptions of the same structure (a CIF and the extxyz
    written from it). The coordinates themselves are not rounded.
    """
    key = np.round(frac_coords, SORT_DECIMALS) % 1.0  # (N, 3)
    return np.lexsort((key[:, 2], key[:, 1], key[:, 0], atomic_numbers))


def canonicalize(
    lattice: np.ndarray, frac_coords: np.ndarray, atomic_numbers: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Niggli-reduced lattice (3, 3), wrapped sorted coordinates (N, 3), matching numbers (N,)."""
    lattice = np.asarray(lattice, dtype=np.float64).reshape(3, 3)
    frac_coords = np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3)
    atomic_numbers = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    reduced, frac = niggli_reduce(lattice, frac_coords)
    order = sort_atoms(frac, atomic_numbers)
    return reduced, np.ascontiguousarray(frac[order]), np.ascontiguousarray(atomic_numbers[order])


def derive_id(source: str) -> str:
    """A stable id for an input that has none: its source, which names file and position.

    Sources are built from the paths as given, so the same command gives the same ids. Very long
    sources are shortened with a hash so ids stay readable.
    """
    if len(source) <= 120:
        return source
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{source[:100]}~{digest}"
