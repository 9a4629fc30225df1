"""What a relaxation gives: `RelaxResult`, and how one is made from a trajectory's energies.

Shared by the serial relaxations of `relax.py` and the batched one of `batched_relax.py`; it imports
neither, so the dependency between those two goes one way only (relax -> batched_relax, which
import-linter keeps so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Structure


@dataclass
class RelaxResult:
    structure: Structure  # relaxed
    energy_per_atom: float  # eV/atom of the relaxed structure
    initial_energy_per_atom: float  # eV/atom of the input structure
    converged: bool
    steps: int  # optimizer steps taken
    rmsd: float  # Å, RMS displacement of atoms from input to relaxed (see `displacement_rmsd`)
    magmoms: list[float] = field(default_factory=list)  # μB per site, when the potential gives them

    def to_json(self) -> dict:
        return {
            "relaxed_structure": self.structure.as_dict(),
            "energy_per_atom": self.energy_per_atom,
            "initial_energy_per_atom": self.initial_energy_per_atom,
            "converged": self.converged,
            "relax_steps": self.steps,
            "rmsd": self.rmsd,
            "magmoms": self.magmoms,
        }

    @classmethod
    def from_json(cls, data: dict) -> RelaxResult:
        return cls(
            structure=Structure.from_dict(data["relaxed_structure"]),
            energy_per_atom=data["energy_per_atom"],
            initial_energy_per_atom=data["initial_energy_per_atom"],
            converged=data["converged"],
            steps=data["relax_steps"],
            rmsd=data["rmsd"],
            magmoms=list(data.get("magmoms") or []),
        )


def relax_result(
    initial: Structure, relaxed: Structure, energies: Sequence[float], max_steps: int, magmoms: list[float]
) -> RelaxResult:
    """A RelaxResult from a trajectory observer's total energies (start, each step, once at the end)."""
    n_atoms = len(initial)
    steps_taken = max(len(energies) - 2, 0)
    return RelaxResult(
        structure=relaxed,
        energy_per_atom=float(energies[-1]) / n_atoms,
        initial_energy_per_atom=float(energies[0]) / n_atoms,
        converged=steps_taken < max_steps,
        steps=steps_taken,
        rmsd=displacement_rmsd(initial, relaxed),
        magmoms=magmoms,
    )


def displacement_rmsd(initial: Structure, relaxed: Structure) -> float:
    """RMS displacement (Å) between the same atoms before and after an in-place relaxation.

    Fractional displacements are wrapped to the nearest image and their mean (a rigid drift of the
    whole crystal, which changes nothing) is removed before converting with the relaxed lattice.
    """
    delta = relaxed.frac_coords - initial.frac_coords  # (N, 3)
    delta -= np.round(delta)
    delta -= delta.mean(axis=0)
    cart = delta @ relaxed.lattice.matrix  # (N, 3) Å
    return float(np.sqrt((cart**2).sum(axis=1).mean()))
