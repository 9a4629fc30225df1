"""Throughput of the SUN evaluation: seconds per 1,000 structures, with and without relaxation.

    python benchmarks/evaluate.py --n 50 --workers 2

Structures are the first N of a CSV with a `cif` column (default: Perov-5 test split beside the
repository, ../shared/data/perov_5/test.csv; DFT-relaxed, so CHGNet relaxations start near a
minimum as they would for a good generator). Elemental references come from a ComputedEntry file
when one is found (a one-time, cached cost otherwise, excluded from the figure either way).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CSV = REPO.parent / "shared" / "data" / "perov_5" / "test.csv"
DEFAULT_ELEMENTAL = REPO.parent / "shared" / "data" / "mp_reference" / "mp_elemental_reference_entries.json.gz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="structures to evaluate")
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--relax-steps", type=int, default=500)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--elemental-reference", default=str(DEFAULT_ELEMENTAL) if DEFAULT_ELEMENTAL.exists() else "")
    args = parser.parse_args()

    import pandas as pd
    from pymatgen.core import Structure

    from xtalgen.evaluation import evaluate_structures
    from xtalgen.schema import EvaluateConfig

    if not Path(args.csv).exists():
        print(f"error: {args.csv} not found (pass --csv)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    frame = pd.read_csv(args.csv, nrows=2 * args.n)
    structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]
    generated, reference = structures[: args.n], structures[args.n :]

    cheap_start = time.perf_counter()
    evaluate_structures(generated, reference=reference, relax=False)
    cheap_seconds = time.perf_counter() - cheap_start

    cfg = EvaluateConfig(
        workers=args.workers, relax_steps=args.relax_steps, relax_fmax=args.fmax,
        elemental_reference=args.elemental_reference, cache_dir=str(REPO / "build" / "eval-cache"),
    )
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    rows, summary = evaluate_structures(generated, reference=reference, relax=True, cfg=cfg)
    seconds = time.perf_counter() - start
    # CPU time (this process + worker processes) over the core count: what the wall time would be
    # on otherwise idle cores; on a shared machine the wall time overstates the cost.
    cpu_seconds = _cpu_seconds() - cpu_start
    steps = [r["relax_steps"] for r in rows if r.get("relaxed")]
    print(json.dumps({
        "benchmark": "evaluate",
        "n": args.n,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "input": Path(args.csv).name,
        "seconds": round(seconds, 2),
        "seconds_per_1000": round(seconds / args.n * 1000, 1),
        "cpu_seconds": round(cpu_seconds, 2),
        "idle_cores_seconds_per_1000": round(cpu_seconds / min(args.workers, os.cpu_count() or 1) / args.n * 1000, 1),
        "cheap_seconds_per_1000": round(cheap_seconds / args.n * 1000, 2),
        "mean_relax_steps": round(sum(steps) / max(len(steps), 1), 1),
        "relax_converged_rate": summary.get("relax_converged_rate"),
        "relax_steps_cap": args.relax_steps,
        "fmax": args.fmax,
        "potential": cfg.potential,
    }))
    return 0


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    sys.exit(main())
