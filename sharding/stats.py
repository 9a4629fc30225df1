"""`shard_stats(dir)`: counts, atoms-per-structure histogram, mean density, elements, property
coverage per split, read from the manifest (or recomputed from the records), and a readable table.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from xtalgen.sharding.manifest import SplitStats, prior_stats
from xtalgen.sharding.reader import open_shards


def shard_stats(shard_dir: str | Path, recompute: bool = False, progress: bool = False) -> dict:
    """{"path", "format", "num_records", "splits": {split: stats}, "prior": stats}, where stats has
    num_records, num_atoms_histogram {n: count}, mean_density (atoms/Å³), element_counts {Z: atoms},
    property_coverage {name: records}. `recompute=True` rescans every record instead of trusting
    the manifest (the result must be identical; a test checks it)."""
    shards = open_shards(shard_dir)
    splits = {}
    for split in shards.splits:
        if recompute:
            acc = SplitStats()
            records = tqdm(shards.iter_records(split), total=shards.num_records(split), desc=split,
                           disable=not progress)
            for r in records:
                acc.add(r)
            splits[split] = prior_stats({"stats": {"split": split, **acc.to_dict()}})
        else:
            splits[split] = shards.split_stats(split)
    return {
        "path": str(shards.location),
        "format": shards.format,
        "num_records": sum(s["num_records"] for s in splits.values()),
        "splits": splits,
        "prior": shards.stats,
        "rejected": dict(shards.manifest.get("rejected", {})),
    }


def format_stats(stats: dict, top_elements: int = 12) -> str:
    """Render `shard_stats` output as plain-text tables for the terminal."""
    from pymatgen.core.periodic_table import Element  # imported on use: slow to import
    lines = [f"{stats['path']}  ({stats['format']}, {stats['num_records']} records)", ""]
    lines.append(f"{'split':<10}{'records':>10}{'atoms min':>11}{'atoms max':>11}{'atoms mean':>12}"
                 f"{'density (Å⁻³)':>16}")
    for split, s in stats["splits"].items():
        hist = s["num_atoms_histogram"]
        total_atoms = sum(n * c for n, c in hist.items())
        mean_atoms = total_atoms / s["num_records"] if s["num_records"] else 0.0
        density = s["mean_density"] if s["mean_density"] is not None else float("nan")
        lines.append(f"{split:<10}{s['num_records']:>10}{min(hist, default=0):>11}{max(hist, default=0):>11}"
                     f"{mean_atoms:>12.2f}{density:>16.5f}")
    prior = stats["prior"]
    label = prior.get("split") or "all splits"
    lines += ["", f"atoms per structure ({label}; the sampling prior)"]
    hist = prior["num_atoms_histogram"]
    peak = max(hist.values(), default=1)
    for n, c in sorted(hist.items()):
        lines.append(f"  {n:>4} {c:>9}  {'#' * max(1, round(40 * c / peak))}")
    elements = sorted(prior["element_counts"].items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{Element.from_Z(z).symbol} {c}" for z, c in elements[:top_elements])
    lines += ["", f"elements ({len(elements)} distinct, atoms): {shown}" + (" ..." if len(elements) > top_elements else "")]
    coverage = prior["property_coverage"]
    if coverage:
        lines += ["", f"property coverage ({label})"]
        for name, c in coverage.items():
            lines.append(f"  {name:<28}{c:>9}  {100.0 * c / max(prior['num_records'], 1):6.1f}%")
    if stats.get("rejected"):
        lines += ["", "rejected at build: " + ", ".join(f"{k} {v}" for k, v in stats["rejected"].items())]
    return "\n".join(lines)
