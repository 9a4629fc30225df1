"""CPU per relaxation step of CHGNet + FIRE + FrechetCellFilter, with and without cell_maths' speed-up.

    python benchmarks/cell_filter_speed.py [--csv ../shared/data/perov_5/test.csv --structures 10]

Relaxes the first structures of a Perov-5 split one at a time (fmax 0.05, up to 500 steps, one torch
thread, subnormals flushed as the evaluator does), each twice: on ASE's plain FrechetCellFilter
(SciPy's logm / expm_frechet) and on one given `evaluation.cell_maths.speed_up_cell_filter`. The two
alternate structure by structure, in alternating order, so a change of machine load hits both
alike. CPU time is `time.process_time` around `optimizer.run`; steps are FIRE's. Reports CPU per
step for both, how many relaxations took the same number of steps, the largest final energy
difference per atom, and how often the fast logm fell back to SciPy's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import time
import warnings

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                      "perov_5", "test.csv"))
    parser.add_argument("--structures", type=int, default=10)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()

    import ase
    import pandas as pd
    import scipy
    import scipy.linalg
    import torch
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    from xtalgen.evaluation.cell_maths import speed_up_cell_filter

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    with contextlib.redirect_stdout(io.StringIO()):
        calculator = CHGNetCalculator(model=CHGNet.load(verbose=False), use_device="cpu")

    # Count the calls that reach SciPy's logm while the fast filter runs: the fallback rate.
    scipy_logm, fallbacks, counting = scipy.linalg.logm, [0], [False]

    def counted_logm(*a, **k):
        fallbacks[0] += counting[0]
        return scipy_logm(*a, **k)

    scipy.linalg.logm = counted_logm

    def relax(structure: Structure, fast: bool) -> tuple[int, float, float]:
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = calculator
        cell_filter = FrechetCellFilter(atoms)
        if fast:
            speed_up_cell_filter(cell_filter)
        optimizer = FIRE(cell_filter, logfile=None)
        counting[0] = fast
        start = time.process_time()
        optimizer.run(fmax=args.fmax, steps=args.steps)
        seconds = time.process_time() - start
        counting[0] = False
        return int(optimizer.nsteps), seconds, float(atoms.get_potential_energy()) / len(atoms)

    frame = pd.read_csv(args.csv, nrows=args.structures)
    structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]
    relax(structures[0], True)  # warm-up: first-call costs of torch and CHGNet out of the timings
    results = {"plain": [], "fast": []}
    for i, structure in enumerate(structures):
        order = ("plain", "fast") if i % 2 == 0 else ("fast", "plain")
        for name in order:
            results[name].append(relax(structure, name == "fast"))

    steps = {name: sum(r[0] for r in rows) for name, rows in results.items()}
    seconds = {name: sum(r[1] for r in rows) for name, rows in results.items()}
    ms_per_step = {name: 1000 * seconds[name] / max(steps[name], 1) for name in results}
    same_steps = sum(p[0] == f[0] for p, f in zip(results["plain"], results["fast"], strict=True))
    energy_gaps = [abs(p[2] - f[2]) for p, f in zip(results["plain"], results["fast"], strict=True)]
    same_gaps = [g for g, p, f in zip(energy_gaps, results["plain"], results["fast"], strict=True) if p[0] == f[0]]
    print(json.dumps({
        "benchmark": "cell_filter_speed",
        "csv": os.path.normpath(args.csv),
        "structures": len(structures),
        "potential": "CHGNet (wheel weights), FIRE + FrechetCellFilter, serial",
        "fmax": args.fmax,
        "max_steps": args.steps,
        "steps_plain": steps["plain"],
        "steps_fast": steps["fast"],
        "cpu_ms_per_step_plain": round(ms_per_step["plain"], 2),
        "cpu_ms_per_step_fast": round(ms_per_step["fast"], 2),
        "cpu_saved_ms_per_step": round(ms_per_step["plain"] - ms_per_step["fast"], 2),
        "speedup": round(ms_per_step["plain"] / ms_per_step["fast"], 3),
        "identical_step_counts": same_steps,
        "max_abs_dE_per_atom_ev": float(f"{max(energy_gaps):.3g}"),
        "max_abs_dE_per_atom_ev_same_steps": float(f"{max(same_gaps):.3g}") if same_gaps else None,
        "fast_logm_fallbacks_to_scipy": fallbacks[0],
        "per_structure": [{"steps": [p[0], f[0]], "cpu_s": [round(p[1], 2), round(f[1], 2)],
                           "dE_per_atom": float(f"{abs(p[2] - f[2]):.3g}")}
                          for p, f in zip(results["plain"], results["fast"], strict=True)],
        "versions": {"ase": ase.__version__, "scipy": scipy.__version__, "numpy": np.__version__,
                     "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "date": datetime.date.today().isoformat(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
