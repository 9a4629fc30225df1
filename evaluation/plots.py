"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_e_above_hull(rows: list[dict], path: Path, threshold: float = 0.1) -> Path | None:
    values = [r["e_above_hull"] for r in rows if isinstance(r.get("e_above_hull"), float) and np.isfinite(r["e_above_hull"])]
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.clip(values, -0.5, 2.0), bins=50, color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"stable < {threshold} eV/atom")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("energy above hull (eV/atom, clipped to [-0.5, 2])")
    ax.set_ylabel("structures")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_element_frequencies(rows: list[dict], path: Path, top: int = 40) -> Path | None:
    counts: Counter = Counter()
    for row in rows:
        if row.get("chemical_system"):
            counts.update(row["chemical_system"].split("-"))
    if not counts:
        return None
    plt = _pyplot()
    elements, frequency = zip(*counts.most_common(top))
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(elements)), 4))
    ax.bar(elements, np.asarray(frequency) / len(rows), color="tab:green")
    ax.set_ylabel("fraction of structures containing")
    ax.tick_params(axis="x", labelrotation=90)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_property_vs_target(rows: list[dict], name: str, path: Path) -> Path | None:
    """Distribution of a numeric property's proxy with the requested target marked."""
    pairs = [(r.get(f"value_{name}"), (r.get("conditions") or {}).get(name)) for r in rows]
    values = [v for v, _ in pairs if isinstance(v, (int, float)) and np.isfinite(v)]
    targets = {str(t) for _, t in pairs if t is not None}
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=40, color="tab:purple")
    for target in targets:
        try:
            ax.axvline(float(target.lstrip("<>=")), color="tab:red", linestyle="--", label=f"target {target}")
        except ValueError:  # categorical target (chemical system): no line to draw
            pass
    ax.set_xlabel(name)
    ax.set_ylabel("structures")
    if targets:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(rows: list[dict], out_dir: Path, threshold: float = 0.1) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [
        plot_e_above_hull(rows, out_dir / "e_above_hull.png", threshold),
        plot_element_frequencies(rows, out_dir / "element_frequencies.png"),
    ]
    names = sorted({n for r in rows for n in (r.get("conditions") or {})})
    for name in names:
        if name in ("chemical_system", "space_group"):
            continue
        made.append(plot_property_vs_target(rows, name, out_dir / f"property_{name}.png"))
    return [p for p in made if p is not None]
