"""`xtalgen evaluate`: score generated crystals (validity, relaxation, stability, SUN, CDVAE metrics)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

EPILOG = """examples:
  xtalgen evaluate samples --reference shards/mp20 --out eval            # full SUN evaluation
  xtalgen evaluate samples.extxyz --out eval --no-relax                   # validity + uniqueness only
  xtalgen evaluate samples --reference train.csv --test-split test.csv --dataset perov_5 --out eval
  xtalgen evaluate cifs/ --out eval --workers 2 evaluate.relax_steps=300  # dotted config overrides
  xtalgen evaluate samples --out eval evaluate.elemental_reference=mp_elemental_entries.json.gz

INPUT is a sampling output folder (samples.jsonl + cifs/), a folder of CIFs, an extxyz file, a CSV
with a `cif` column or a shard set. Outputs in --out: per_structure.csv, summary.json, PNG plots,
and per_structure.jsonl - the log that makes a rerun continue an interrupted evaluation.
Reference energies are cached under evaluate.cache_dir (default ~/.cache/xtalgen/evaluation),
keyed by the reference's manifest hash, so a shard set is relaxed once for all evaluations.
"""

CSV_FIRST_COLUMNS = [
    "id", "formula", "chemical_system", "num_atoms", "num_elements", "valid", "struct_valid",
    "struct_reason", "comp_valid", "min_distance", "volume", "density", "space_group", "relaxed",
    "relax_converged", "relax_steps", "relax_error", "rmsd", "energy_per_atom", "e_above_hull",
    "formation_energy_per_atom", "stable", "on_or_below_hull", "unique", "duplicate_of", "novel", "sun",
    "hhi_score", "mag_density",
]




def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score generated crystals: validity, stability, uniqueness, novelty (SUN)",
        description="Evaluate generated crystals: validity, relaxation with an ML potential, energy "
        "above hull, uniqueness, novelty, SUN, property targets and the CDVAE benchmark metrics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="sampling output folder, CIF folder, extxyz, CSV or shard set")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. evaluate.relax_steps=300 (the `evaluate.` prefix is optional)")
    parser.add_argument("--out", required=True, help="output directory (an existing one is resumed)")
    parser.add_argument("--reference", help="training structures (shard set, CSV, CIFs, extxyz) for novelty and hull")
    parser.add_argument("--test-split", help="test structures (CSV or shard set) for the CDVAE metrics")
    parser.add_argument("--dataset", choices=["perov_5", "carbon_24", "mp_20"],
                        help="CDVAE coverage cutoffs (default: guessed from --test-split, else mp_20)")
    parser.add_argument("--comp-scaler", help='JSON {"means": [...], "stds": [...]} for composition fingerprints')
    parser.add_argument("--config", action="append", default=[], help="YAML config or preset name")
    parser.add_argument("--no-relax", action="store_true", help="skip relaxation (and stability)")
    parser.add_argument("--workers", type=int, help="processes for relaxation and matching")
    parser.add_argument("--potential", help="interatomic potential by name (default chgnet)")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xtalgen.schema import load_config

    overrides = [o if o.split("=")[0].count(".") and o.split(".")[0] in _SECTIONS else f"evaluate.{o}"
                 for o in args.overrides]
    if args.workers is not None:
        overrides.append(f"evaluate.workers={args.workers}")
    if args.potential:
        overrides.append(f"evaluate.potential={args.potential}")
    if args.no_relax:
        overrides.append("evaluate.relax=false")
    cfg = load_config(args.config, overrides).evaluate
    summary = run_evaluation(
        args.input, args.out, cfg, reference=args.reference, test_split=args.test_split,
        dataset=args.dataset, comp_scaler=args.comp_scaler, plots=not args.no_plots,
        progress=not args.no_progress,
    )
    _print_summary(summary, Path(args.out))
    return 0


_SECTIONS = ("data", "model", "train", "sample", "evaluate")


def run_evaluation(
    input_path: str,
    out_dir: str | Path,
    cfg,
    *,
    reference: str | None = None,
    test_split: str | None = None,
    dataset: str | None = None,
    comp_scaler: str | None = None,
    plots: bool = True,
    progress: bool = True,
) -> dict:
    """Everything `xtalgen evaluate` does; returns the summary written to summary.json."""
    from xtalgen.evaluation.inputs import iter_structures
    from xtalgen.evaluation.pipeline import RELAXED_KEY, evaluate_inputs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_resume_settings(out, cfg)
    started = time.perf_counter()
    items = list(iter_structures(input_path))
    rows, summary = evaluate_inputs(
        items, reference, cfg.relax, cfg=cfg, log_path=out / "per_structure.jsonl", progress=progress
    )
    summary["input"] = str(input_path)
    summary["reference"] = str(reference) if reference else None
    if test_split:
        summary["cdvae"] = _cdvae(items, test_split, dataset, comp_scaler, cfg, progress)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    _write_csv(rows, out / "per_structure.csv", exclude={RELAXED_KEY})
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, sort_keys=True) + "\n")
    if plots:
        from xtalgen.evaluation.plots import write_plots

        summary["plots"] = [p.name for p in write_plots(rows, out, cfg.stability_threshold)]
    return summary


def _check_resume_settings(out: Path, cfg) -> None:
    """The per-structure log is reused on a rerun; refuse to mix results made with other settings."""
    from xtalgen.schema import ConfigError

    settings = {k: getattr(cfg, k) for k in ("potential", "relax", "relax_steps", "relax_fmax", "symprec")}
    path = out / "settings.json"
    if path.exists() and (out / "per_structure.jsonl").exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            raise ConfigError(
                f"{out} holds an evaluation made with {previous}; this one asks for {settings}. "
                "Use another --out (or delete per_structure.jsonl to start over)."
            )
    path.write_text(json.dumps(settings, sort_keys=True) + "\n")


def _cdvae(items, test_split, dataset, comp_scaler, cfg, progress) -> dict:
    from xtalgen.evaluation.cdvae_metrics import (
        CompositionScaler,
        cdvae_metrics,
        dataset_name,
        featurize,
        load_features,
        magpie_source,
        save_features,
    )
    from xtalgen.evaluation.hull import default_cache_dir, reference_key
    from xtalgen.evaluation.inputs import iter_structures

    name = dataset or dataset_name(str(test_split))
    # The test split's fingerprints are the slow part (CrystalNN on every site): cached by content.
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    cache = cache_dir / "cdvae" / f"{reference_key(test_split)}-{magpie_source()}.npz"
    if cache.exists():
        test_features = load_features(cache)
    else:
        test = [i.structure for i in iter_structures(test_split, split="test") if i.structure is not None]
        test_features = featurize(test, cfg.workers, progress)
        save_features(cache, test_features)
    scaler = CompositionScaler.load(comp_scaler) if comp_scaler else None
    return cdvae_metrics([i.structure for i in items], [], name, comp_scaler=scaler,
                         workers=cfg.workers, progress=progress, test_features=test_features)


def _write_csv(rows: list[dict], path: Path, exclude: set[str]) -> None:
    import csv

    keys = [k for k in CSV_FIRST_COLUMNS if any(k in r for r in rows)]
    extra = sorted({k for r in rows for k in r if k not in keys and k not in exclude and k != "conditions"})
    columns = keys + extra + (["conditions"] if any(r.get("conditions") for r in rows) else [])
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = dict(row)
            if "conditions" in columns:
                out["conditions"] = json.dumps(row.get("conditions") or {}, sort_keys=True)
            writer.writerow(out)
    tmp.replace(path)


def _finite(value):
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _print_summary(summary: dict, out: Path) -> None:
    def pct(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{100 * value:.1f}%"

    lines = [
        f"evaluated {summary['num_structures']} structures in {summary['seconds']:.1f} s",
        f"  valid {pct('valid_rate')} (structural {pct('struct_valid_rate')}, compositional {pct('comp_valid_rate')})",
        f"  unique {pct('unique_rate')}   novel {pct('novel_rate')}",
    ]
    if "stable_rate" in summary:
        lines.append(f"  stable {pct('stable_rate')}   on/below hull {pct('on_or_below_hull_rate')}   SUN {pct('sun_rate')}")
    if "cdvae" in summary:
        c = summary["cdvae"]
        lines.append(f"  CDVAE ({c['dataset']}): COV-R {c['cov_recall']:.3f}  COV-P {c['cov_precision']:.3f}  "
                     f"wdist density {c['wdist_density']:.4f}  wdist #elements {c['wdist_num_elements']:.4f}")
    lines.extend(f"  note: {n}" for n in summary.get("notes", []))
    lines.append(f"outputs: {out}/per_structure.csv, {out}/summary.json")
    print("\n".join(lines), file=sys.stdout)
