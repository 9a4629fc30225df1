"""Flat, padding-free batches of crystals: what loaders yield and what models consume.

Atoms of all structures are concatenated; `batch_index[i]` says which structure atom i belongs to.
Lives in the core package so that both the data path and the models can use it without importing
each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from xtalgen.property_encoding import encode_column
from xtalgen.record import CrystalRecord


@dataclass
class CrystalBatch:
    lattice: torch.Tensor  # (B, 3, 3) rows are lattice vectors, Å
    frac_coords: torch.Tensor  # (N_total, 3) in [0, 1)
    atomic_numbers: torch.Tensor  # (N_total,) long, 1..100
    num_atoms: torch.Tensor  # (B,) long
    batch_index: torch.Tensor  # (N_total,) long, structure of each atom
    ids: list[str] = field(default_factory=list)
    # name -> (B,) tensor of values (float for scalars, long for categorical codes) and a (B,) bool
    # mask saying which structures carry the property.
    properties: dict[str, torch.Tensor] = field(default_factory=dict)
    property_mask: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_structures(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def num_atoms_total(self) -> int:
        return int(self.atomic_numbers.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CrystalBatch:
        """Move to a device; `dtype` (if given) applies to the floating-point geometry."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                changes[f.name] = move(value)
            elif isinstance(value, dict):
                changes[f.name] = {k: move(v) for k, v in value.items()}
        return replace(self, **changes)


def collate(records: Sequence[CrystalRecord], property_names: Sequence[str] = ()) -> CrystalBatch:
    """Concatenate records into one flat batch (numpy first, one tensor per field)."""
    if not records:
        raise ValueError("cannot collate an empty list of records")
    num_atoms = np.fromiter((r.num_atoms for r in records), dtype=np.int64, count=len(records))
    lattice = np.stack([r.lattice for r in records])
    frac = np.concatenate([r.frac_coords for r in records])
    z = np.concatenate([r.atomic_numbers for r in records])
    batch_index = np.repeat(np.arange(len(records), dtype=np.int64), num_atoms)
    props, masks = {}, {}
    for name in property_names:  # the loader's encoding exactly (xtalgen.property_encoding)
        column, mask = encode_column([r.properties.get(name) for r in records], name)
        props[name], masks[name] = torch.from_numpy(column), torch.from_numpy(mask)
    return CrystalBatch(
        lattice=torch.from_numpy(lattice),
        frac_coords=torch.from_numpy(frac),
        atomic_numbers=torch.from_numpy(z),
        num_atoms=torch.from_numpy(num_atoms),
        batch_index=torch.from_numpy(batch_index),
        ids=[r.id for r in records],
        properties=props,
        property_mask=masks,
    )
