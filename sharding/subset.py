"""Property subsets: index views of the records that carry a property, never copies of the data.

`make_subset(dir, "dft_mag_density", max_n=5000)` writes `DIR/subsets/dft_mag_density-5000.json`
listing, per split, the record indices that carry the property (ascending), with counts. When
`max_n` is smaller than what is available, the kept records are the first `max_n` in the order of
sha256(f"{seed}:{record id}"): deterministic, independent of record order, and nested (the 5k
subset is contained in the 50k one for the same seed), like MatterGen's 5k...605k fine-tuning sets.
Loaders take the subset name and read only those indices. A subset records the hash of the
manifest it was made from and is refused for any other build.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xtalgen.sharding.codec import record_key, unpack
from xtalgen.sharding.manifest import has_value, manifest_hash
from xtalgen.sharding.reader import open_shards

SUBSET_DIR = "subsets"


def subset_name(property_name: str, max_n: int | None) -> str:
    return property_name if max_n is None else f"{property_name}-{max_n}"


def _order_key(seed: int, record_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "big")


def _select(shards, split: str, property_name: str, max_n: int | None, seed: int, progress: bool) -> dict:
    order, indices = array("Q"), array("q")
    values = shards.iter_values(split)
    for index, value, shard in tqdm(values, total=shards.num_records(split), desc=f"subset {split}",
                                    disable=not progress):
        payload = unpack(value, shard, record_key(index))
        if has_value(payload["props"].get(property_name)):
            order.append(_order_key(seed, payload["id"]))
            indices.append(index)
    order_np, indices_np = np.frombuffer(order, np.uint64), np.frombuffer(indices, np.int64)
    available = len(indices_np)
    if max_n is not None and available > max_n:
        keep = np.lexsort((indices_np, order_np))[:max_n]  # by hash, index breaks ties
        indices_np = indices_np[keep]
    chosen = np.sort(indices_np)
    return {"available": available, "count": int(len(chosen)), "indices": chosen.tolist()}


def make_subset(
    shard_dir: str | Path,
    property_name: str,
    max_n: int | None = None,
    split: str | Sequence[str] | None = "train",
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the subset index of records carrying `property_name`; returns the JSON path.

    `split`: one split, several, or None for every split; `max_n` caps each split separately.
    """
    if max_n is not None and max_n < 1:
        raise ValueError("max_n must be >= 1")
    shards = open_shards(shard_dir)
    splits = shards.splits if split is None else [split] if isinstance(split, str) else list(split)
    coverage = shards.stats["property_coverage"]
    for s in splits:
        shards.num_records(s)  # raises a clear KeyError for an unknown split
    payload = {
        "property": property_name,
        "max_n": max_n,
        "seed": seed,
        "manifest_sha256": manifest_hash(shards.path),
        "splits": {s: _select(shards, s, property_name, max_n, seed, progress) for s in splits},
    }
    if not any(v["count"] for v in payload["splits"].values()):
        known = ", ".join(sorted(coverage)) or "none"
        raise ValueError(f"no record in {', '.join(splits)} carries {property_name!r} (properties: {known})")
    out = shards.path / SUBSET_DIR / f"{subset_name(property_name, max_n)}.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out


def load_subset(shard_dir: str | Path, subset: str | Path) -> dict:
    """Read a subset by name (`dft_band_gap-5000`) or path; checks it belongs to this build.

    Returns the JSON payload with `indices` of each split as an int64 numpy array.
    """
    shard_dir = Path(shard_dir)
    path = Path(subset)
    if not path.suffix == ".json" or not path.exists():
        path = shard_dir / SUBSET_DIR / f"{subset}.json"
    if not path.exists():
        available = sorted(p.stem for p in (shard_dir / SUBSET_DIR).glob("*.json"))
        raise FileNotFoundError(
            f"no subset {subset!r} in {shard_dir} (have: {', '.join(available) or 'none'}); "
            "make one with `xtalgen shard subset DIR --property NAME [--max N]`"
        )
    payload = json.loads(path.read_text())
    if payload["manifest_sha256"] != manifest_hash(shard_dir):
        raise ValueError(f"subset {path} was made from a different build of {shard_dir}; remake it")
    for info in payload["splits"].values():
        info["indices"] = np.asarray(info["indices"], dtype=np.int64)
    return payload
