"""Throughput of the SUN evaluation: seconds per 1,000 structures, with and without relaxation.

    python benchmarks/evaluate.py --n 50 --workers 2
    python benchmarks/evaluate.py --n 100 --workers 2 --reference ../shared/data/perov_5/val.csv --compare \
        --screen-fmax 0.1 --refine-window 0.2

Structures are the first N of a CSV with a `cif` column (default: Perov-5 test split beside the
repository, ../shared/data/perov_5/test.csv; DFT-relaxed, so CHGNet relaxations start near a
minimum as they would for a good generator). The reference (novelty, and the hull with the elemental
entries) is the next N rows of that CSV, or `--reference CSV` (all of it: Perov-5 val.csv gives 151
of the first 200 test structures a compound of their chemical system; the next 200 rows only 10, so
most stability is then "not assessed"). Elemental references come from a ComputedEntry file when
one is found. The reference structures the hull needs are relaxed and cached before the clock starts
(`reference_warmup_seconds`, a one-time cost per reference set).

Relaxation follows the evaluator's config: one pass to `--fmax` by default; `--screen-fmax 0.1` for
the two-pass mode (every structure to 0.1 eV/Å, then those below the stability threshold plus
`--refine-window` eV/atom above the hull on to `--fmax`). `--compare` evaluates the same structures
both ways, one pass first, and reports the cost of each and the differences of the metrics;
`--baseline-rows` takes the differences against the one-pass rows of an earlier `--rows-out`
instead. CPU seconds over the worker count is the idle-core estimate. Prints one JSON line;
`--rows-out FILE` writes the per-structure figures of each run (JSONL).
"""

from __future__ import annotations

import argparse
import json
import math
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
    from xtalgen.schema import EvaluateConfig

    defaults = EvaluateConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50, help="structures to evaluate")
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--reference", default="next",
                        help="'next' (the next N rows of --csv) or a CSV of reference structures")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--relax-steps", type=int, default=500)
    parser.add_argument("--fmax", type=float, default=defaults.relax_fmax)
    parser.add_argument("--screen-fmax", type=float, default=defaults.relax_screen_fmax,
                        help="two-pass screening fmax (default: the config's; 0 = one pass to --fmax)")
    parser.add_argument("--refine-window", type=float, default=defaults.refine_window)
    parser.add_argument("--compare", action="store_true", help="one pass and two-pass on the same structures")
    parser.add_argument("--rows-out", help="per-structure figures (JSONL)")
    parser.add_argument("--baseline-rows", help="--rows-out of an earlier one-pass run of the same structures: "
                        "the differences are taken against it (instead of --compare's own one-pass run)")
    parser.add_argument("--elemental-reference", default=str(DEFAULT_ELEMENTAL) if DEFAULT_ELEMENTAL.exists() else "")
    args = parser.parse_args()

    import pandas as pd
    from pymatgen.core import Structure

    from xtalgen.evaluation import evaluate_structures
    from xtalgen.evaluation.pipeline import warm_reference_energies

    if not Path(args.csv).exists():
        print(f"error: {args.csv} not found (pass --csv)", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    frame = pd.read_csv(args.csv, nrows=2 * args.n)
    structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]
    generated, reference = structures[: args.n], structures[args.n :]
    if args.reference != "next":
        reference = [Structure.from_str(cif, fmt="cif") for cif in pd.read_csv(args.reference)["cif"]]

    cheap_start = time.perf_counter()
    evaluate_structures(generated, reference=reference, relax=False)
    cheap_seconds = time.perf_counter() - cheap_start

    base = dict(workers=args.workers, relax_steps=args.relax_steps, relax_fmax=args.fmax,
                refine_window=args.refine_window, elemental_reference=args.elemental_reference,
                cache_dir=str(REPO / "build" / "eval-cache"))
    warm_start = time.perf_counter()
    warm_count = warm_reference_energies(generated, reference, EvaluateConfig(**base))
    warm_seconds = time.perf_counter() - warm_start

    modes = {"two_pass" if args.screen_fmax else "one_pass": args.screen_fmax or None}
    if args.compare:
        modes = {"one_pass": None, "two_pass": args.screen_fmax or 0.1}
    runs = {}
    for name, screen in modes.items():
        cfg = EvaluateConfig(**base, relax_screen_fmax=screen)
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        rows, summary = evaluate_structures(generated, reference=reference, relax=True, cfg=cfg)
        seconds = time.perf_counter() - start
        # CPU time (this process + worker processes) over the core count: what the wall time would
        # be on otherwise idle cores; on a shared machine the wall time overstates the cost.
        runs[name] = (rows, summary, seconds, _cpu_seconds() - cpu_start, os.getloadavg()[0])

    result = {
        "benchmark": "evaluate",
        "n": args.n,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "input": Path(args.csv).name,
        "reference": "next N rows" if args.reference == "next" else Path(args.reference).name,
        "reference_warmup_structures": warm_count,
        "reference_warmup_seconds": round(warm_seconds, 1),
        "cheap_seconds_per_1000": round(cheap_seconds / args.n * 1000, 2),
        "relax_steps_cap": args.relax_steps,
        "fmax": args.fmax,
        "potential": EvaluateConfig().potential,
    }
    for name, (rows, summary, seconds, cpu_seconds, load) in runs.items():
        steps = [r["relax_steps"] for r in rows if r.get("relaxed")]
        result[name] = {
            "screen_fmax": summary.get("relax_screen_fmax"),
            "refine_window": summary.get("refine_window"),
            "seconds": round(seconds, 2),
            "seconds_per_1000": round(seconds / args.n * 1000, 1),
            "cpu_seconds": round(cpu_seconds, 2),
            "idle_cores_seconds_per_1000": round(cpu_seconds / min(args.workers, os.cpu_count() or 1) / args.n * 1000, 1),
            "mean_relax_steps": round(sum(steps) / max(len(steps), 1), 1),
            "relax_converged_rate": summary.get("relax_converged_rate"),
            "refined_count": summary.get("refined_count"),
            "relaxed_count": summary.get("relaxed_count"),
            "stability_not_assessed_count": summary.get("stability_not_assessed_count"),
            "stable_rate": summary.get("stable_rate"),
            "sun_rate": summary.get("sun_rate"),
            "on_or_below_hull_rate": summary.get("on_or_below_hull_rate"),
            "mean_e_above_hull": summary.get("mean_e_above_hull"),
            "load_average_1min_after": round(load, 2),
        }
    if args.compare:
        result["differences"] = _differences(runs["one_pass"][0], runs["two_pass"][0])
    elif args.baseline_rows and "two_pass" in runs:
        baseline = [json.loads(line) for line in Path(args.baseline_rows).read_text().splitlines()]
        baseline = [row for row in baseline if row.pop("mode") == "one_pass"]
        two = runs["two_pass"][0]
        if [row["id"] for row in baseline] != [row["id"] for row in two]:
            print(f"error: {args.baseline_rows} holds other structures", file=sys.stderr)
            return 2
        result["differences"] = {"against": Path(args.baseline_rows).name, **_differences(baseline, two)}
    if args.rows_out:
        with open(args.rows_out, "w") as handle:
            for name, (rows, *_) in runs.items():
                for row in rows:
                    handle.write(json.dumps({"mode": name, **{k: row.get(k) for k in ROW_KEYS}}) + "\n")
    print(json.dumps(result))
    return 0


ROW_KEYS = ("id", "formula", "relaxed", "relax_converged", "relax_steps", "screen_relax_steps", "refined",
            "relax_fmax_reached", "energy_per_atom", "screen_energy_per_atom", "e_above_hull", "screen_e_above_hull",
            "stable", "on_or_below_hull", "unique", "novel", "sun", "stability_not_assessed", "relax_failure")


def _differences(one: list[dict], two: list[dict]) -> dict:
    """Two-pass minus one-pass, per structure (same ids in the same order)."""
    def finite(value) -> bool:
        return isinstance(value, float) and math.isfinite(value)

    def max_abs(pairs) -> float | None:
        deltas = [abs(b - a) for a, b in pairs]
        return round(max(deltas), 5) if deltas else None

    pairs = [(a, b) for a, b in zip(one, two) if finite(a.get("e_above_hull")) and finite(b.get("e_above_hull"))]
    refined = [(a["e_above_hull"], b["e_above_hull"]) for a, b in pairs if b.get("refined")]
    kept = [(a["e_above_hull"], b["e_above_hull"]) for a, b in pairs if not b.get("refined")]
    kept_assessed = [(a["e_above_hull"], b["e_above_hull"]) for a, b in pairs
                     if not b.get("refined") and not b.get("stability_not_assessed")]
    lowering = sorted(b["screen_energy_per_atom"] - b["energy_per_atom"] for b in two if b.get("refined"))
    n = len(one)
    return {
        "stable_rate": _rate(two, "stable") - _rate(one, "stable"),
        "sun_rate": _rate(two, "sun") - _rate(one, "sun"),
        "on_or_below_hull_rate": _rate(two, "on_or_below_hull") - _rate(one, "on_or_below_hull"),
        "stable_flips": sum(1 for a, b in zip(one, two) if bool(a.get("stable")) != bool(b.get("stable"))),
        "sun_flips": sum(1 for a, b in zip(one, two) if bool(a.get("sun")) != bool(b.get("sun"))),
        "max_abs_e_above_hull_refined": max_abs(refined),
        "max_abs_e_above_hull_unrefined": max_abs(kept),
        "max_abs_e_above_hull_unrefined_assessed": max_abs(kept_assessed),
        "refined_fraction": round(sum(1 for b in two if b.get("refined")) / n, 4) if n else None,
        "refine_lowering_median": round(lowering[len(lowering) // 2], 5) if lowering else None,
        "refine_lowering_max": round(lowering[-1], 5) if lowering else None,
    }


def _rate(rows: list[dict], key: str) -> float:
    return sum(1 for r in rows if r.get(key)) / len(rows) if rows else float("nan")


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    sys.exit(main())
