"""The shard-set manifest (`DIR/manifest.json`) and the statistics it carries for the model.

The manifest says what the shards are (format, per split and per shard: records, bytes, sha256),
where they came from (sources with hashes, rejected counts by reason, the data config), and what
the model needs from the data: the number-of-atoms histogram (sampling prior), the mean atomic
density N/V (lattice prior), element counts and property coverage. Its bytes are deterministic:
no timestamps, sorted keys, so the same input gives the same manifest and the same
`manifest_hash`, which run directories record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

from xtalgen.property_encoding import has_value
from xtalgen.record import CrystalRecord

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Split whose statistics are the model's priors; others are reported per split only.
PRIOR_SPLIT = "train"


def created_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"xtalgen {version('xtalgen')}"
    except PackageNotFoundError:
        return "xtalgen (unknown version)"


class SplitStats:
    """Streaming statistics of one split: O(distinct values) memory, never the records."""

    def __init__(self) -> None:
        self.num_records = 0
        self.num_atoms_histogram: Counter[int] = Counter()
        self.element_counts: Counter[int] = Counter()
        self.property_coverage: Counter[str] = Counter()
        # Densities are summed with math.fsum in blocks: accurate, and bounded memory on 600k records.
        self._density_sum = 0.0
        self._densities: list[float] = []

    def add(self, record: CrystalRecord) -> None:
        num_atoms = record.num_atoms
        self.num_records += 1
        self.num_atoms_histogram[num_atoms] += 1
        self.element_counts.update(record.atomic_numbers.tolist())
        for name, value in record.properties.items():
            if has_value(value):
                self.property_coverage[name] += 1
        self._densities.append(num_atoms / _volume(record.lattice))
        if len(self._densities) >= 65536:
            self._flush()

    def _flush(self) -> None:
        self._density_sum = math.fsum([self._density_sum, *self._densities])
        self._densities.clear()

    def to_dict(self) -> dict:
        """JSON-ready (string keys in increasing numeric order)."""
        self._flush()
        return {
            "num_records": self.num_records,
            "num_atoms_histogram": {str(n): self.num_atoms_histogram[n] for n in sorted(self.num_atoms_histogram)},
            "mean_density": self._density_sum / self.num_records if self.num_records else None,
            "element_counts": {str(z): self.element_counts[z] for z in sorted(self.element_counts)},
            "property_coverage": {k: self.property_coverage[k] for k in sorted(self.property_coverage)},
        }


def _volume(lattice: np.ndarray) -> float:
    """|det| of a 3x3 lattice by the triple product on Python floats: ~15x faster than
    np.linalg.det for one small matrix, which matters once per record on 600k records."""
    (a1, a2, a3), (b1, b2, b3), (c1, c2, c3) = lattice.tolist()
    return abs(a1 * (b2 * c3 - b3 * c2) - a2 * (b1 * c3 - b3 * c1) + a3 * (b1 * c2 - b2 * c1))


def prior_stats(manifest: dict) -> dict:
    """Statistics of the prior split with integer keys: what models and samplers consume.

    Returns {"num_records", "num_atoms_histogram" {n: count}, "mean_density" (atoms/Å³),
    "element_counts" {Z: atoms}, "property_coverage" {name: records}, "split"}.
    """
    stats = manifest["stats"]
    return {
        "split": stats.get("split"),
        "num_records": stats["num_records"],
        "num_atoms_histogram": {int(n): c for n, c in stats["num_atoms_histogram"].items()},
        "mean_density": stats["mean_density"],
        "element_counts": {int(z): c for z, c in stats["element_counts"].items()},
        "property_coverage": dict(stats["property_coverage"]),
    }


def merge_stats(parts: list[dict]) -> dict:
    """Combine `SplitStats.to_dict()` outputs (used when there is no train split)."""
    total = sum(p["num_records"] for p in parts)
    hist, elements, coverage = Counter(), Counter(), Counter()
    density_sum = 0.0
    for p in parts:
        hist.update({int(k): v for k, v in p["num_atoms_histogram"].items()})
        elements.update({int(k): v for k, v in p["element_counts"].items()})
        coverage.update(p["property_coverage"])
        if p["num_records"]:
            density_sum += p["mean_density"] * p["num_records"]
    return {
        "num_records": total,
        "num_atoms_histogram": {str(n): hist[n] for n in sorted(hist)},
        "mean_density": density_sum / total if total else None,
        "element_counts": {str(z): elements[z] for z in sorted(elements)},
        "property_coverage": {k: coverage[k] for k in sorted(coverage)},
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(shard_dir: str | Path) -> Path:
    path = Path(shard_dir)
    return path if path.name == MANIFEST_NAME else path / MANIFEST_NAME


def manifest_hash(shard_dir: str | Path) -> str:
    """sha256 of `manifest.json` (accepts the shard directory or the file): identifies a shard set."""
    return file_sha256(manifest_path(shard_dir))


def dumps(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def write_manifest(shard_dir: Path, manifest: dict) -> Path:
    """Write atomically: a crash leaves either the old manifest or the new one, never half of one."""
    path = shard_dir / MANIFEST_NAME
    tmp = shard_dir / f"{MANIFEST_NAME}.tmp"
    try:
        tmp.write_bytes(dumps(manifest))
    except OSError:  # a full disk: leave no half-written manifest behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def read_manifest(shard_dir: str | Path) -> dict:
    path = manifest_path(shard_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: not a shard directory, or its build did not finish "
            "(build it with `xtalgen shard build`)"
        )
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> dict:
    """A manifest from its bytes (however they were fetched); `where` names it in errors."""
    try:
        manifest = json.loads(data)
    except ValueError as exc:  # an HTML error page from a server, a half-written file
        raise ValueError(f"{where}: not a shard manifest ({exc})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(f"{where}: manifest schema_version {version!r}, this xtalgen reads {SCHEMA_VERSION}")
    return manifest
