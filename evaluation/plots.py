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


E_HULL_RANGE = (-0.5, 2.0)  # eV/atom shown; values outside are put in the end bins
E_HULL_BIN = 0.1  # eV/atom


def plot_e_above_hull(rows: list[dict], path: Path, threshold: float = 0.1) -> Path | None:
    fig = e_above_hull_figure(rows, threshold)
    return _save(fig, path) if fig is not None else None


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def e_above_hull_figure(rows: list[dict], threshold: float = 0.1):
    """Histogram of energies above hull, each bar labelled with its count; None without values."""
    # Structures whose stability was not assessed (no compound of their system in the hull) have
    # only a formation energy: plotting it as an energy above the hull would count them as stable.
    values = [r["e_above_hull"] for r in rows if isinstance(r.get("e_above_hull"), float)
              and np.isfinite(r["e_above_hull"]) and not r.get("stability_not_assessed")]
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    low, high = E_HULL_RANGE
    bins = np.linspace(low, high, int(round((high - low) / E_HULL_BIN)) + 1)
    counts, _, bars = ax.hist(np.clip(values, low, high), bins=bins, color="tab:blue", edgecolor="white")
    ax.bar_label(bars, labels=[str(int(c)) if c else "" for c in counts], fontsize=7, padding=1)
    ax.axvline(threshold, color="tab:red", linestyle="--",
               label=f"stable < {threshold} eV/atom: {sum(v < threshold for v in values)}")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"energy above hull (eV/atom, clipped to [{low}, {high}])")
    ax.set_ylabel("structures")
    ax.set_ylim(0, max(counts.max() * 1.15, 1))
    ax.set_title(_count_title("Energy above hull", len(values), len(rows), "with an energy above hull"))
    ax.legend()
    fig.tight_layout()
    return fig


def _count_title(title: str, n: int, total: int, what: str) -> str:
    """"Title (n = 12)", or "Title (n = 12 of 16 structures with ...)" when some are left out."""
    return f"{title} (n = {n})" if n == total else f"{title} (n = {n} of {total} structures {what})"


def plot_element_frequencies(rows: list[dict], path: Path, top: int = 40) -> Path | None:
    fig = element_frequencies_figure(rows, top)
    return _save(fig, path) if fig is not None else None


def element_frequencies_figure(rows: list[dict], top: int = 40):
    counts: Counter = Counter()
    for row in rows:
        if row.get("chemical_system"):
            counts.update(row["chemical_system"].split("-"))
    if not counts:
        return None
    plt = _pyplot()
    parsed = sum(1 for row in rows if row.get("chemical_system"))
    elements, frequency = zip(*counts.most_common(top))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(elements)), 4))
    bars = ax.bar(elements, np.asarray(frequency) / parsed, color="tab:green")
    ax.bar_label(bars, labels=[str(f) for f in frequency], fontsize=7, padding=1)
    ax.set_ylabel("fraction of structures containing")
    ax.set_ylim(0, 1.1 * max(frequency) / parsed)
    ax.set_title(_count_title("Element frequencies", parsed, len(rows), "that could be read"))
    ax.tick_params(axis="x", labelrotation=90)
    fig.tight_layout()
    return fig


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
    ax.set_title(_count_title(name, len(values), len(rows), f"with a {name} value"))
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
