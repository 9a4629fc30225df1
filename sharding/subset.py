"""Property subsets: index views of the records that carry a property, never copies of the data.

`make_subset(dir, "dft_mag_density", max_n=5000)` writes `DIR/subsets/dft_mag_density-5000.json`
listing, per split, the record indices that carry the property (ascending), with counts. When
`max_n` is smaller than what is available, the kept records are the first `max_n` in the order of
sha256(f"{seed}:{record id}"): deterministic, independent of record order, and nested (the 5k
subset is contained in the 50k one for the same seed), like MatterGen's 5k...605k fine-tuning sets.
Loaders take the subset name and read only those indices. A subset records the hash of the
manifest it was made from and is refused for any other build.

Several properties (`["dft_mag_density", "hhi_score"]`, named `dft_mag_density+hhi_score`) select
the records that carry all of them: what a multi-property fine-tuning trains on. For each numeric
property the subset also stores the statistics of the kept records (count, mean, std and 1,001
quantiles): fine-tuning standardises the property with them and samples range targets from them.
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


QUANTILE_POINTS = 1001


def property_list(properties: str | Sequence[str]) -> list[str]:
    """'a+b', 'a' or ['b', 'a'] -> the distinct names, sorted (one subset per set of properties)."""
    names = properties.split("+") if isinstance(properties, str) else list(properties)
    names = sorted({n.strip() for n in names if n.strip()})
    if not names:
        raise ValueError("a subset needs at least one property name")
    return names


def subset_name(properties: str | Sequence[str], max_n: int | None) -> str:
    joined = "+".join(property_list(properties))
    return joined if max_n is None else f"{joined}-{max_n}"


def _order_key(seed: int, record_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "big")


def _select(shards, split: str, names: list[str], max_n: int | None, seed: int, progress: bool) -> dict:
    order, indices = array("Q"), array("q")
    values: dict[str, list] = {n: [] for n in names}
    records = shards.iter_values(split)
    for index, value, shard in tqdm(records, total=shards.num_records(split), desc=f"subset {split}",
                                    disable=not progress):
        payload = unpack(value, shard, record_key(index))
        props = payload["props"]
        if all(has_value(props.get(n)) for n in names):
            order.append(_order_key(seed, payload["id"]))
            indices.append(index)
            for n in names:
                values[n].append(props[n])
    order_np, indices_np = np.frombuffer(order, np.uint64), np.frombuffer(indices, np.int64)
    available = len(indices_np)
    keep = np.arange(available)
    if max_n is not None and available > max_n:
        keep = np.lexsort((indices_np, order_np))[:max_n]  # by hash, index breaks ties
    keep = keep[np.argsort(indices_np[keep], kind="stable")]  # ascending record index
    chosen = indices_np[keep]
    stats = {n: _value_stats([values[n][i] for i in keep]) for n in names}
    return {"available": available, "count": int(len(chosen)), "indices": chosen.tolist(),
            "values": {n: v for n, v in stats.items() if v is not None}}


def _value_stats(values: list) -> dict | None:
    """count, mean, std and 1,001 quantiles of numeric values; None for text (chemical systems)."""
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    array_ = np.asarray(values, dtype=np.float64)
    return {
        "count": int(array_.size),
        "mean": float(array_.mean()),
        "std": float(array_.std()),
        "quantiles": np.quantile(array_, np.linspace(0.0, 1.0, QUANTILE_POINTS)).tolist(),
    }


def make_subset(
    shard_dir: str | Path,
    property_name: str | Sequence[str],
    max_n: int | None = None,
    split: str | Sequence[str] | None = "train",
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the subset index of records carrying `property_name` (a name, 'a+b', or a list: all of
    them); returns the JSON path.

    `split`: one split, several, or None for every split; `max_n` caps each split separately.
    """
    names = property_list(property_name)
    if max_n is not None and max_n < 1:
        raise ValueError("max_n must be >= 1")
    shards = open_shards(shard_dir)
    splits = shards.splits if split is None else [split] if isinstance(split, str) else list(split)
    coverage = shards.stats["property_coverage"]
    for s in splits:
        shards.num_records(s)  # raises a clear KeyError for an unknown split
    payload = {
        "property": "+".join(names),
        "properties": names,
        "max_n": max_n,
        "seed": seed,
        "manifest_sha256": manifest_hash(shards.path),
        "splits": {s: _select(shards, s, names, max_n, seed, progress) for s in splits},
    }
    if not any(v["count"] for v in payload["splits"].values()):
        known = ", ".join(sorted(coverage)) or "none"
        raise ValueError(f"no record in {', '.join(splits)} carries {' and '.join(map(repr, names))} "
                         f"(properties: {known})")
    out = shards.path / SUBSET_DIR / f"{subset_name(names, max_n)}.json"
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
