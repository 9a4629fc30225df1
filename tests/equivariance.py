"""Reusable symmetry checks for anything that maps a batch of crystals to
(invariant per-atom, equivariant per-atom vector, equivariant per-structure symmetric matrix) outputs.

A model under test is wrapped as `fn(batch: FlatBatch) -> (invariant (N, ...), vector (N, 3),
matrix (B, 3, 3))`. `assert_symmetries` then checks, in whatever dtype the batch has:

* rotation of the Cartesian frame (lattice rows rotated, fractional coordinates unchanged):
  invariant unchanged, vector -> vector R^T, matrix -> R M R^T
* permutation of the atoms inside each structure: outputs permuted the same way
* a global translation of the fractional coordinates of a structure (wrapped into [0, 1)):
  nothing changes
* a different choice of periodic image (integer vectors added to some fractional coordinates):
  nothing changes

`structures_from_csv` and `flat_batch` build batches from real CIF rows (pymatgen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Structure


@dataclass
class FlatBatch:
    atomic_numbers: torch.Tensor  # (N,) long
    frac_coords: torch.Tensor  # (N, 3)
    lattice: torch.Tensor  # (B, 3, 3) rows are lattice vectors
    num_atoms: torch.Tensor  # (B,) long
    batch_index: torch.Tensor  # (N,) long


Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def structures_from_csv(path: Path, count: int, skip: int = 0) -> list[Structure]:
    """The first `count` structures (after `skip`) of a CSV with a `cif` column."""
    frame = pd.read_csv(path, nrows=skip + count)
    return [Structure.from_str(cif, fmt="cif") for cif in frame["cif"].iloc[skip:]]


def flat_batch(structures: list[Structure], dtype=torch.float64) -> FlatBatch:
    num_atoms = torch.tensor([len(s) for s in structures])
    return FlatBatch(
        atomic_numbers=torch.from_numpy(np.concatenate([s.atomic_numbers for s in structures])).long(),
        frac_coords=torch.from_numpy(np.concatenate([s.frac_coords for s in structures]) % 1.0).to(dtype),
        lattice=torch.from_numpy(np.stack([s.lattice.matrix for s in structures])).to(dtype),
        num_atoms=num_atoms,
        batch_index=torch.repeat_interleave(torch.arange(len(structures)), num_atoms),
    )


def jitter(batch: FlatBatch, sigma_frac: float, generator: torch.Generator, sigma_lattice: float = 0.0) -> FlatBatch:
    """Add Gaussian noise to fractional coordinates (and, relative, to the lattice): breaks the exact
    distance ties of symmetric crystals (as diffusion noise does), so a top-k neighbour cut is well
    defined. Position noise alone leaves the ties between an atom's own images in a cubic cell."""
    dtype = batch.frac_coords.dtype
    noise = sigma_frac * torch.randn(batch.frac_coords.shape, generator=generator, dtype=dtype)
    strain = sigma_lattice * torch.randn(batch.lattice.shape, generator=generator, dtype=dtype)
    lattice = batch.lattice @ (torch.eye(3, dtype=dtype) + strain)
    return replace(batch, frac_coords=(batch.frac_coords + noise) % 1.0, lattice=lattice)


def random_rotation(generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Uniformly random proper rotation (3, 3), det +1 (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def random_within_structure_permutation(batch: FlatBatch, generator: torch.Generator) -> torch.Tensor:
    """(N,) permutation that shuffles atoms only inside their own structure."""
    starts = torch.cumsum(batch.num_atoms, 0) - batch.num_atoms
    parts = [int(s) + torch.randperm(int(n), generator=generator) for s, n in zip(starts, batch.num_atoms)]
    return torch.cat(parts)


def rotated(batch: FlatBatch, rotation: torch.Tensor) -> FlatBatch:
    return replace(batch, lattice=batch.lattice @ rotation.T)  # row vectors a -> R a


def permuted(batch: FlatBatch, perm: torch.Tensor) -> FlatBatch:
    return replace(batch, atomic_numbers=batch.atomic_numbers[perm], frac_coords=batch.frac_coords[perm])


def translated(batch: FlatBatch, generator: torch.Generator) -> FlatBatch:
    shift = torch.rand(batch.lattice.shape[0], 3, generator=generator, dtype=batch.frac_coords.dtype)
    return replace(batch, frac_coords=(batch.frac_coords + shift[batch.batch_index]) % 1.0)


def other_images(batch: FlatBatch, generator: torch.Generator) -> FlatBatch:
    """Move about half of the atoms to another periodic image (integer shifts in -2..2)."""
    n = batch.frac_coords.shape[0]
    shift = torch.randint(-2, 3, (n, 3), generator=generator)
    shift = shift * (torch.rand(n, 1, generator=generator) < 0.5)
    return replace(batch, frac_coords=batch.frac_coords + shift.to(batch.frac_coords.dtype))


def symmetry_errors(
    fn: Callable[[FlatBatch], Outputs], batch: FlatBatch, generator: torch.Generator
) -> dict[str, tuple[Outputs, Outputs]]:
    """For each symmetry: (expected outputs from the reference, outputs on the transformed input)."""
    inv, vec, mat = fn(batch)
    rot = random_rotation(generator, batch.lattice.dtype)
    perm = random_within_structure_permutation(batch, generator)
    return {
        "rotation": ((inv, vec @ rot.T, rot @ mat @ rot.T), fn(rotated(batch, rot))),
        "permutation": ((inv[perm], vec[perm], mat), fn(permuted(batch, perm))),
        "translation": ((inv, vec, mat), fn(translated(batch, generator))),
        "periodic_image": ((inv, vec, mat), fn(other_images(batch, generator))),
    }


def assert_symmetries(
    fn: Callable[[FlatBatch], Outputs],
    batch: FlatBatch,
    generator: torch.Generator,
    rtol: float = 1e-9,
    atol: float = 1e-10,
) -> None:
    """Raise (naming the symmetry and output) if any check fails; tolerances as torch.testing."""
    for symmetry, (expected, actual) in symmetry_errors(fn, batch, generator).items():
        for name, e, a in zip(("invariant", "vector", "matrix"), expected, actual):
            torch.testing.assert_close(
                a, e, rtol=rtol, atol=atol, msg=lambda m, s=symmetry, n=name: f"{s} / {n}: {m}"
            )
