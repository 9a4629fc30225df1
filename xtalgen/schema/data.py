"""Config of the data path: readers, validation, shard building, loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PropertyColumn:
    """Maps an input column to a named property (so users add properties with no code)."""

    column: str = ""
    name: str = ""
    kind: Literal["float", "int", "str"] = "float"


@dataclass
class ReaderConfig:
    id_column: str = "material_id"
    cif_column: str = "cif"
    # Input column -> property. MatterGen's names are the defaults for the public sets.
    properties: list[PropertyColumn] = field(default_factory=list)
    compute_hhi: bool = False  # add `hhi_score` computed from composition
    default_properties: bool = True  # MatterGen names for known columns (band_gap -> dft_band_gap, ...)
    chemical_system: bool = True  # add `chemical_system` (elements sorted, joined by '-')
    # Add `space_group` (spglib at symprec 0.1 Å, as the evaluator judges it) where no column gives it.
    compute_space_group: bool = False


@dataclass
class ValidationConfig:
    min_distance: float = 0.5  # Å, MatterGen's validity bound
    max_atoms: int = 20  # MP-20 / Alex-MP-20 models
    min_volume: float = 0.1  # Å³
    max_atomic_number: int = 100


@dataclass
class ShardConfig:
    format: Literal["lmdb", "webdataset"] = "lmdb"
    workers: int = 1
    chunk_size: int = 2048  # raw records per unit of parallel (and resumable) work
    records_per_shard: int = 20000  # webdataset tar shards; ~10-100 MB each at MP-20 sizes
    # Split assignment by a hash of the id, used when an input does not name its split.
    split_fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05}
    )
    # auto: an input named train/val/test (file stem) keeps that split, others go by hash;
    # hash: always by hash of the id; any other value: every record goes to that split.
    split: str = "auto"


@dataclass
class LoaderConfig:
    batch_size: int = 32  # structures per batch (upper bound)
    max_atoms_per_batch: int = 0  # atom budget; 0 = no budget
    shuffle: bool = True
    shuffle_buffer: int = 2048
    seed: int = 0
    num_workers: int = 0
    drop_last: bool = False


@dataclass
class DataConfig:
    shards: str = ""  # shard directory to train from
    train_split: str = "train"
    val_split: str = "val"
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
