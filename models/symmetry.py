"""Space-group constraints for sampling: keep every state of a trajectory symmetric under a template.

A *template* is one crystal's symmetry written in its own cell (what `xtalgen.sampling.templates`
reads with spglib from training structures): operations g = 1..m acting on fractional column
vectors, x -> R_g x + t_g with integer R_g, and for each operation the permutation pi_g of the
template's n atoms it induces (R_g x_i + t_g = x_{pi_g(i)} mod 1). A structure of n atoms in any
cell is symmetric under the template when

    lattice:      R_g^T G R_g = G for every g, with the metric G = L L^T (rows of L: lattice vectors);
    coordinates:  R_g x_i + t_g = x_{pi_g(i)} (mod 1) for every g and i;
    types:        the atoms of one orbit {pi_g(i) : g} hold one element.

`SymmetryConstraint.project` maps a sampler state onto that set, and the sampler applies it to the
prior and after every step. DiffCSP++ (Jiao et al., ICLR 2024) instead diffuses only the free
Wyckoff parameters; projecting the whole state keeps the three processes exactly as trained. It is
sound because the score network is equivariant: for a symmetric state its predicted coordinate and
lattice scores are themselves symmetric, so the projection removes only the noise's asymmetric part
(tests/test_symmetry.py checks the coordinate output to 1e-10). One exception: the cap on neighbours
per atom (`max_neighbors`) keeps an arbitrary subset of equally distant neighbours when it cuts
through a shell, which a symmetric crystal has many of; the projection removes that part too. The Wyckoff positions come with the template: an atom on a
special position (an operation other than the identity maps it to itself) stays on it.

The projections:

* lattice: the group average G' = (1/m) sum_g R_g^T G R_g (idempotent, and positive definite when
  G is), then L' = G'^(1/2), the symmetric factor the lattice process keeps (`polar_symmetric`);
* coordinates: each orbit's representative r moves to the point y of its Wyckoff position that
  places the orbit closest to the current atoms, the least-squares fit
  min_y sum_g |R_g y + t_g - x_{pi_g(r)}|^2 (each x_{pi_g(r)} the periodic image nearest
  R_g x_r + t_g) over the affine set {p_r + V_r u} of points the site-symmetry group
  {g : pi_g(r) = r} fixes, through the template's own (exactly symmetric) position p_r, with V_r
  spanning the null space of the stacked R_g - I; then every atom i of the orbit is placed at
  R_h y + t_h for one h with pi_h(r) = i. The result is symmetric by construction, whatever the
  input, and each Wyckoff position keeps its letter (an atom on the inversion centre at the origin
  stays there, not on the one at 1/2). Being a least-squares fit, the map is the orthogonal
  projection (in fractional coordinates, where the coordinate noise is isotropic) near a symmetric
  state, also where R_g is not orthogonal (hexagonal and trigonal cells), where a plain mean of
  the images R_g^-1 (x_{pi_g(r)} - t_g) would project obliquely;
* types: when any atom of an orbit is unmasked, all of them take the element of the first one.

Written by hand because no library projects batched torch states onto a space group: spglib and
pymatgen symmetrise one finished structure on the CPU, and only within their tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xtalgen.models.coords_process import wrap
from xtalgen.models.types_process import MASK_TOKEN

NULL_SPACE_TOL = 1e-8


@dataclass(frozen=True)
class SymmetryTemplate:
    """One crystal's symmetry in its own cell (see the module docstring); numpy, no torch."""

    space_group: int
    rotations: np.ndarray  # (m, 3, 3) int: R_g on fractional column vectors
    translations: np.ndarray  # (m, 3) float: t_g
    permutations: np.ndarray  # (m, n) int: pi_g, atom i -> atom pi_g(i)
    positions: np.ndarray  # (n, 3) float: the template's own fractional coordinates, exactly symmetric
    source: str = ""  # where it was read (an id of the training structure)
    wyckoffs: str = ""  # spglib's Wyckoff letter per atom, for the record

    def __post_init__(self) -> None:
        m, n = self.permutations.shape
        if self.rotations.shape != (m, 3, 3) or self.translations.shape != (m, 3) \
                or self.positions.shape != (n, 3):
            raise ValueError(f"template {self.source!r}: {m} permutations but rotations "
                             f"{self.rotations.shape}, translations {self.translations.shape} and "
                             f"positions {self.positions.shape}")
        if not np.array_equal(np.sort(self.permutations, axis=1), np.broadcast_to(np.arange(n), (m, n))):
            raise ValueError(f"template {self.source!r}: an operation does not permute the atoms")
        if not any(np.array_equal(r, np.eye(3)) and np.allclose(t - np.round(t), 0)
                   for r, t in zip(self.rotations, self.translations)):
            raise ValueError(f"template {self.source!r} lacks the identity operation")

    @property
    def num_atoms(self) -> int:
        return int(self.permutations.shape[1])

    @property
    def num_operations(self) -> int:
        return int(self.permutations.shape[0])

    def orbits(self) -> np.ndarray:
        """(n,) the smallest atom index of each atom's orbit (its representative)."""
        return self.permutations.min(axis=0)  # the orbit of i is {pi_g(i) : g}, the same set for every member

    def site_basis(self, atom: int) -> np.ndarray:
        """(d, 3) orthonormal directions atom `atom` may move in, keeping its site symmetry (d = 0..3):
        the null space of R_g - I stacked over the operations that fix it."""
        fixing = self.rotations[self.permutations[:, atom] == atom] - np.eye(3)  # (k, 3, 3)
        _, singular, vt = np.linalg.svd(fixing.reshape(-1, 3))
        return vt[singular < NULL_SPACE_TOL]

    def site_solver(self, atom: int) -> np.ndarray:
        """(3, 3) K = V^T (V A V^T)^-1 V with A = sum_g R_g^T R_g: the least-squares step of the
        representative `atom` within its Wyckoff position (module docstring); 0 if nothing is free."""
        free = self.site_basis(atom)  # (d, 3)
        if len(free) == 0:
            return np.zeros((3, 3))
        normal = np.einsum("gji,gjk->ik", self.rotations, self.rotations)  # (3, 3) sum_g R_g^T R_g
        return free.T @ np.linalg.inv(free @ normal @ free.T) @ free


class SymmetryConstraint:
    """Batched projection of sampler states onto the symmetric set of one template per structure.

    Built for a batch of B structures whose atoms are concatenated in order (structure b has
    `templates[b].num_atoms` atoms), on the sampler's device and dtype. M is the largest number of
    operations in the batch; shorter lists are padded with the identity (weight 0).
    """

    def __init__(self, templates: list[SymmetryTemplate], device, dtype: torch.dtype):
        if not templates:
            raise ValueError("a symmetry constraint needs one template per structure")
        self.templates = list(templates)
        self.num_atoms = torch.tensor([t.num_atoms for t in templates], dtype=torch.long, device=device)
        num_ops = max(t.num_operations for t in templates)
        total = int(self.num_atoms.sum())
        rot = np.tile(np.eye(3), (len(templates), num_ops, 1, 1))  # (B, M, 3, 3)
        op_valid = np.zeros((len(templates), num_ops), dtype=bool)  # (B, M)
        source = np.tile(np.arange(total)[:, None], (1, num_ops))  # (N, M) global pi_g(i)
        shift = np.zeros((total, num_ops, 3))  # (N, M, 3) t_g
        representative = np.zeros(total, dtype=np.int64)  # (N,) global index of the orbit's first atom
        place_rot = np.tile(np.eye(3), (total, 1, 1))  # (N, 3, 3) R_h with pi_h(r) = i
        place_shift = np.zeros((total, 3))  # (N, 3) t_h
        anchor = np.zeros((total, 3))  # (N, 3) the template's position of the atom's representative
        solver = np.zeros((total, 3, 3))  # (N, 3, 3) K of the atom as a representative (`site_solver`)
        offset = 0
        for b, template in enumerate(templates):
            m, n = template.num_operations, template.num_atoms
            atoms = slice(offset, offset + n)
            rot[b, :m] = template.rotations
            op_valid[b, :m] = True
            source[atoms, :m] = offset + template.permutations.T
            shift[atoms, :m] = template.translations[None]
            reps = template.orbits()
            representative[atoms] = offset + reps
            anchor[atoms] = template.positions
            solver[atoms] = np.stack([template.site_solver(i) for i in range(n)])
            for i in range(n):  # one operation carrying the representative onto atom i
                g = int(np.flatnonzero(template.permutations[:, reps[i]] == i)[0])
                place_rot[offset + i] = template.rotations[g]
                place_shift[offset + i] = template.translations[g]
            offset += n

        def tensor(a, kind=dtype):
            return torch.as_tensor(a, device=device).to(kind)

        self.rot = tensor(rot)
        self.op_weight = tensor(op_valid)  # (B, M): 1 for a real operation
        self.source = tensor(source, torch.long)
        self.shift = tensor(shift)
        self.representative = tensor(representative, torch.long)
        self.place_rot = tensor(place_rot)
        self.place_shift = tensor(place_shift)
        self.anchor = tensor(anchor)
        self.solver = tensor(solver)
        batch_index = torch.repeat_interleave(torch.arange(len(templates), device=device), self.num_atoms)
        # per atom: its structure's R_g, zero on padding, and A = sum_g R_g^T R_g
        self.forward = (self.rot * self.op_weight[..., None, None])[batch_index]  # (N, M, 3, 3)
        self.normal = torch.einsum("nmji,nmjk->nik", self.forward, self.forward)  # (N, 3, 3)

    # --- projections ---------------------------------------------------------------------------
    def lattice(self, lattice: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) -> the symmetric factor of the group-averaged metric, (B, 3, 3)."""
        metric = lattice @ lattice.transpose(1, 2)  # (B, 3, 3) G = L L^T
        images = self.rot.transpose(2, 3) @ metric[:, None] @ self.rot  # (B, M, 3, 3) R^T G R
        weight = self.op_weight[..., None, None]
        averaged = (images * weight).sum(1) / weight.sum(1)  # (B, 3, 3)
        averaged = 0.5 * (averaged + averaged.transpose(1, 2))
        values, vectors = torch.linalg.eigh(averaged)
        root = values.clamp_min(torch.finfo(values.dtype).tiny).sqrt()
        return vectors @ torch.diag_embed(root) @ vectors.transpose(1, 2)

    def coords(self, frac: torch.Tensor) -> torch.Tensor:
        """(N, 3) fractional coordinates -> symmetric ones in [0, 1), (N, 3).

        Every row is fitted as if it were its orbit's representative (only the representatives'
        fits are used). For the atom at x (taken as the image nearest p) and miss_g =
        R_g x + t_g - x_{pi_g(r)} (nearest image), the normal equations of the fit give
        y = p + K (A (x - p) - sum_g R_g^T miss_g), with A and K of `SymmetryTemplate.site_solver`.
        """
        away = frac - self.anchor  # (N, 3) x - p, nearest image
        away = away - torch.round(away)
        image = torch.einsum("nmij,nj->nmi", self.forward, frac) + self.shift  # (N, M, 3) R_g x + t_g
        miss = image - frac[self.source]
        miss = miss - torch.round(miss)  # (N, M, 3) the lift of each image
        residual_pull = torch.einsum("nmji,nmj->ni", self.forward, miss)  # (N, 3) sum_g R_g^T miss_g (padding: R = 0)
        # y = p + K (A (x - p) - sum_g R_g^T miss_g): on the Wyckoff position, since K's range is V
        site = self.anchor + torch.einsum("nij,nj->ni", self.solver,
                                          torch.einsum("nij,nj->ni", self.normal, away) - residual_pull)
        placed = torch.einsum("nij,nj->ni", self.place_rot, site[self.representative]) + self.place_shift
        return wrap(placed)

    # --- noise in the symmetric set -------------------------------------------------------------
    # The Langevin corrector sizes its step from |noise| / |score| (`models.sampler`). At a symmetric
    # state the score lies in the few directions the symmetry leaves free (one parameter of a 3c
    # position instead of six coordinates, two of a rhombohedral cell instead of nine), so full-space
    # noise would make the step too large by their ratio: on R-3m carbon it blew 22-36 % of the cells
    # up to 10^3-10^8 Å^3/atom. The corrector therefore draws its noise in the symmetric set: the
    # tangent of the projection at the current state, by a finite difference of step h.
    def coord_tangent(self, frac: torch.Tensor, noise: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
        """(N, 3) noise -> its component along the symmetric set at the symmetric state `frac`."""
        moved = self.coords(frac + h * noise) - self.coords(frac)
        return (moved - torch.round(moved)) / h

    def lattice_tangent(self, lattice: torch.Tensor, noise: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
        """(B, 3, 3) noise -> its component along the symmetric lattices at `lattice`."""
        return (self.lattice(lattice + h * noise) - self.lattice(lattice)) / h

    def types(self, atomic_numbers: torch.Tensor, mask_token: int = MASK_TOKEN) -> torch.Tensor:
        """(N,) -> every atom of an orbit takes the element of its first unmasked atom (else stays masked)."""
        total = atomic_numbers.shape[0]
        index = torch.arange(total, device=atomic_numbers.device)
        key = torch.where(atomic_numbers != mask_token, index, torch.full_like(index, total))
        first = torch.full_like(index, total).scatter_reduce(0, self.representative, key, "amin")  # per representative
        chosen = first[self.representative]  # (N,)
        return torch.where(chosen < total, atomic_numbers[chosen.clamp_max(total - 1)],
                           torch.full_like(atomic_numbers, mask_token))

    def check_sizes(self, num_atoms: torch.Tensor) -> None:
        if not torch.equal(num_atoms.to(self.num_atoms.device), self.num_atoms):
            raise ValueError("the symmetry templates' atom counts differ from the structures to sample")
