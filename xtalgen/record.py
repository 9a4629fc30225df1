"""The one crystal record type used everywhere, and its safe binary encoding.

A record is a periodic crystal: lattice rows are the lattice vectors in Å, fractional coordinates
are wrapped to [0, 1), atomic numbers are 1..100 (MatterGen's element vocabulary), plus an id and a
dict of named properties (float, int, str, or absent).

The encoding is msgpack of raw little-endian array bytes: it cannot execute code when decoded, so
shards built by a stranger are safe to read (never pickle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

MAX_ATOMIC_NUMBER = 100
PropertyValue = float | int | str

_ENCODING_VERSION = 1


@dataclass
class CrystalRecord:
    id: str
    lattice: np.ndarray  # (3, 3) float64, rows are lattice vectors, Å
    frac_coords: np.ndarray  # (N, 3) float64 in [0, 1)
    atomic_numbers: np.ndarray  # (N,) int64 in 1..100
    properties: dict[str, PropertyValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lattice = np.asarray(self.lattice, dtype=np.float64).reshape(3, 3)
        self.frac_coords = np.asarray(self.frac_coords, dtype=np.float64).reshape(-1, 3)
        self.atomic_numbers = np.asarray(self.atomic_numbers, dtype=np.int64).reshape(-1)
        if len(self.frac_coords) != len(self.atomic_numbers):
            raise ValueError(
                f"record {self.id!r}: {len(self.frac_coords)} coordinates but "
                f"{len(self.atomic_numbers)} atomic numbers"
            )

    @property
    def num_atoms(self) -> int:
        return int(len(self.atomic_numbers))

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.lattice)))

    @property
    def density(self) -> float:
        """Atomic number density, atoms per Å³ (the lattice prior's ρ)."""
        return self.num_atoms / self.volume

    def cart_coords(self) -> np.ndarray:
        return self.frac_coords @ self.lattice

    def equals(self, other: CrystalRecord) -> bool:
        """Exact equality of every field (bitwise on arrays)."""
        return (
            self.id == other.id
            and np.array_equal(self.lattice, other.lattice)
            and np.array_equal(self.frac_coords, other.frac_coords)
            and np.array_equal(self.atomic_numbers, other.atomic_numbers)
            and _props_equal(self.properties, other.properties)
        )

    # --- pymatgen interop -------------------------------------------------------------------
    def to_structure(self):
        from pymatgen.core import Lattice, Structure

        return Structure(
            Lattice(self.lattice),
            [int(z) for z in self.atomic_numbers],
            self.frac_coords,
            coords_are_cartesian=False,
        )

    @classmethod
    def from_structure(cls, structure, id: str, properties: dict | None = None) -> CrystalRecord:
        if not structure.is_ordered:
            raise ValueError(f"record {id!r}: structure is disordered (partial occupancy)")
        return cls(
            id=id,
            lattice=structure.lattice.matrix.copy(),
            frac_coords=structure.frac_coords.copy(),
            atomic_numbers=np.array([site.specie.Z for site in structure], dtype=np.int64),
            properties=dict(properties or {}),
        )


def _props_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb):
            continue
        if type(va) is not type(vb) or va != vb:
            return False
    return True


def encode_record(record: CrystalRecord) -> bytes:
    """Encode a record as msgpack; arrays travel as raw little-endian bytes (lossless)."""
    payload: dict[str, Any] = {
        "v": _ENCODING_VERSION,
        "id": record.id,
        "n": record.num_atoms,
        "lattice": record.lattice.astype("<f8").tobytes(),
        "frac": record.frac_coords.astype("<f8").tobytes(),
        "z": record.atomic_numbers.astype("<u1").tobytes(),
        "props": record.properties,
    }
    return msgpack.packb(payload, use_bin_type=True)


def decode_record(data: bytes) -> CrystalRecord:
    """Decode bytes from `encode_record`. Raises ValueError on anything malformed."""
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if payload.get("v") != _ENCODING_VERSION:
            raise ValueError(f"unknown record encoding version {payload.get('v')!r}")
        n = int(payload["n"])
        lattice = np.frombuffer(payload["lattice"], dtype="<f8").reshape(3, 3)
        frac = np.frombuffer(payload["frac"], dtype="<f8").reshape(n, 3)
        z = np.frombuffer(payload["z"], dtype="<u1").astype(np.int64)
        return CrystalRecord(
            id=str(payload["id"]),
            lattice=lattice.astype(np.float64),
            frac_coords=frac.astype(np.float64),
            atomic_numbers=z,
            properties=dict(payload["props"]),
        )
    except ValueError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on corrupt input
        raise ValueError(f"undecodable record: {type(exc).__name__}: {exc}") from exc
