"""Write a simulated Alex-MP-20-sized CSV (label: "simulated") for shard-build benchmarks.

The real Alex-MP-20 (607,683 structures) is not on benchmark machines. This script replicates
real rows of Perov-5, Carbon-24 and the MP-20 sample (from ../shared/data) with small random
perturbations of cell lengths (1%), angles (0.5°) and fractional coordinates (0.003), and writes
them in the exact MP-20 / Alex-MP-20 CSV layout (unnamed index, material_id,
formation_energy_per_atom, band_gap, pretty_formula, e_above_hull, elements, cif,
spacegroup.number) with unique ids `sim-NNNNNNN`. The CIF text follows pymatgen's P1 layout, as
the public files do. Property values are random (simulated) too.

    python benchmarks/simulate.py --n 20000 --out /tmp/simulated_20000.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"
COLUMNS = ["", "material_id", "formation_energy_per_atom", "band_gap", "pretty_formula", "e_above_hull",
           "elements", "cif", "spacegroup.number"]
TEMPLATE_FILES = ("perov_5/val.csv", "perov_5/test.csv", "carbon_24/val.csv", "carbon_24/test.csv",
                  "mattergen/mp_20_sample.csv")


@dataclass
class Template:
    cell: np.ndarray  # (6,) a, b, c, alpha, beta, gamma
    frac: np.ndarray  # (N, 3)
    symbols: list[str]
    formula: str  # data_ block name / pretty formula
    formula_sum: str
    units_z: str


def load_templates(shared: Path, max_atoms: int, per_file: int) -> list[Template]:
    from pymatgen.core.periodic_table import Element

    from xtalgen.datasets.validation import parse_p1_cif

    csv.field_size_limit(sys.maxsize)
    templates = []
    for relative in TEMPLATE_FILES:
        with open(shared / relative, newline="") as handle:
            for row in islice(csv.DictReader(handle), per_file):
                cell, frac, numbers = parse_p1_cif(row["cif"])
                if len(numbers) > max_atoms:
                    continue
                text = row["cif"]
                templates.append(Template(
                    cell=np.array(cell), frac=frac, symbols=[Element.from_Z(int(z)).symbol for z in numbers],
                    formula=_field(text, r"^data_(\S+)"),
                    formula_sum=_field(text, r"^_chemical_formula_sum\s+(.+)$").strip("'"),
                    units_z=_field(text, r"^_cell_formula_units_Z\s+(\S+)"),
                ))
    return templates


def _field(text: str, pattern: str) -> str:
    match = re.search(pattern, text, flags=re.MULTILINE)
    return match.group(1).strip() if match else ""


def cell_volume(a, b, c, alpha, beta, gamma) -> float:
    ca, cb, cg = (math.cos(math.radians(x)) for x in (alpha, beta, gamma))
    return a * b * c * math.sqrt(max(1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg, 0.0))


def cif_text(t: Template, cell: np.ndarray, frac: np.ndarray) -> str:
    """pymatgen's P1 CIF layout, as in the public CSV releases."""
    a, b, c, alpha, beta, gamma = cell
    lines = [
        "# generated using pymatgen", f"data_{t.formula}", "_symmetry_space_group_name_H-M   'P 1'",
        f"_cell_length_a   {a:.8f}", f"_cell_length_b   {b:.8f}", f"_cell_length_c   {c:.8f}",
        f"_cell_angle_alpha   {alpha:.8f}", f"_cell_angle_beta   {beta:.8f}", f"_cell_angle_gamma   {gamma:.8f}",
        "_symmetry_Int_Tables_number   1", f"_chemical_formula_structural   {t.formula}",
        f"_chemical_formula_sum   '{t.formula_sum}'", f"_cell_volume   {cell_volume(*cell):.8f}",
        f"_cell_formula_units_Z   {t.units_z}", "loop_", " _symmetry_equiv_pos_site_id",
        " _symmetry_equiv_pos_as_xyz", "  1  'x, y, z'", "loop_", " _atom_site_type_symbol",
        " _atom_site_label", " _atom_site_symmetry_multiplicity", " _atom_site_fract_x", " _atom_site_fract_y",
        " _atom_site_fract_z", " _atom_site_occupancy",
    ]
    lines += [f"  {s}  {s}{k}  1  {x:.8f}  {y:.8f}  {z:.8f}  1" for k, (s, (x, y, z)) in enumerate(zip(t.symbols, frac))]
    return "\n".join(lines) + "\n"


def simulate(n: int, out: Path, shared: Path = DEFAULT_SHARED, seed: int = 0, max_atoms: int = 20,
             per_file: int = 4000) -> dict:
    templates = load_templates(shared, max_atoms, per_file)
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        picks = rng.integers(0, len(templates), n)
        for k in range(n):
            t = templates[picks[k]]
            cell = t.cell * np.concatenate([1 + rng.normal(0, 0.01, 3), np.ones(3)])
            cell[3:] += rng.normal(0, 0.5, 3)
            frac = t.frac + rng.normal(0, 0.003, t.frac.shape)
            elements = "[" + ", ".join(f"'{s}'" for s in sorted(set(t.symbols))) + "]"
            writer.writerow([
                k, f"sim-{k:07d}", f"{rng.normal(-1.0, 0.5):.6f}", f"{max(0.0, rng.normal(1.0, 1.0)):.6f}",
                t.formula, f"{abs(rng.normal(0, 0.05)):.6f}", elements, cif_text(t, cell, frac), 1,
            ])
    tmp.replace(out)
    return {"rows": n, "templates": len(templates), "path": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="rows to write (Alex-MP-20 has 607683)")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder with the real CSVs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    info = simulate(args.n, args.out, args.shared, args.seed)
    print(json.dumps({"benchmark": "simulate", "data": "simulated", **info,
                      "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
