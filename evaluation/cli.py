"""`xtalgen evaluate`: score generated crystals (validity, relaxation, stability, SUN, CDVAE metrics)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from xtalgen.dirlock import DirectoryLock

EPILOG = """examples:
  xtalgen evaluate samples --reference shards/mp20 --out eval            # full SUN evaluation
  xtalgen evaluate samples.extxyz --out eval --no-relax                   # validity + uniqueness only
  xtalgen evaluate samples --reference train.csv --test-split test.csv --dataset perov_5 --out eval
  xtalgen evaluate cifs/ --out eval --workers 2 evaluate.relax_steps=300  # dotted config overrides
  xtalgen evaluate cifs/ --out eval --max-relax-atoms 500                 # also relax cells of up to 500 atoms
  xtalgen evaluate samples --reference shards/mp20 --out eval relax_screen_fmax=0.1  # two-pass: see README
  xtalgen evaluate samples --out eval evaluate.elemental_reference=mp_elemental_entries.json.gz
  xtalgen data download mp_hull --out data/mp_hull                       # Materials Project entries
  xtalgen evaluate samples --reference shards/mp20 --hull data/mp_hull --out eval   # hull of MP compounds

INPUT is a sampling output folder (samples.jsonl + cifs/), a folder of CIFs, an extxyz file, a CSV
with a `cif` column or a shard set. Outputs in --out: per_structure.csv, summary.json, PNG plots,
and per_structure.jsonl - the log that makes a rerun continue an interrupted evaluation.
Reference energies are cached under evaluate.cache_dir (default ~/.cache/xtalgen/evaluation),
keyed by the reference's manifest hash, so a shard set is relaxed once for all evaluations.

A structure is a physical cell when its volume per atom lies in the reference's range (+/- 20 %),
or without a reference in the default band of 5-60 Å³/atom; other cells are not structurally
valid and are not relaxed. Without a hull of real compounds (--hull or --reference) stability
and SUN are reported as not assessed.

A structure that cannot be read (bad CIF, unknown element, bytes that are not text) or on which a
check fails is a row with a `not_evaluated` reason, counted in the summary; the rest go on.
Structures of more than --max-relax-atoms atoms (default 200) are not relaxed, and so never
stable; a rerun into the same --out with a larger limit relaxes just those.
"""

CSV_FIRST_COLUMNS = [
    "id", "not_evaluated", "not_evaluated_detail", "formula", "chemical_system", "num_atoms", "num_elements", "valid", "struct_valid",
    "struct_reason", "physical_cell", "volume_per_atom", "struct_valid_cdvae", "comp_valid", "min_distance",
    "volume", "density", "space_group", "relaxed", "relax_converged", "relax_steps", "refined", "relax_fmax_reached",
    "relax_failure", "relax_error", "rmsd", "energy_per_atom", "e_above_hull", "screen_energy_per_atom",
    "screen_e_above_hull",
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
    parser.add_argument("--hull", help="convex-hull entries (ComputedEntry JSON, e.g. `xtalgen data download "
                        "mp_hull`): the hull instead of the relaxed reference set")
    parser.add_argument("--allow-elements-only-hull", action="store_true",
                        help="assess stability even when the hull has elemental references only")
    parser.add_argument("--test-split", help="test structures (CSV or shard set) for the CDVAE metrics")
    parser.add_argument("--dataset", choices=["perov_5", "carbon_24", "mp_20"],
                        help="CDVAE coverage cutoffs (default: guessed from --test-split, else mp_20)")
    parser.add_argument("--comp-scaler", help='JSON {"means": [...], "stds": [...]} for composition fingerprints')
    parser.add_argument("--config", action="append", default=[], help="YAML config or preset name")
    parser.add_argument("--no-relax", action="store_true", help="skip relaxation (and stability)")
    parser.add_argument("--max-relax-atoms", type=int, metavar="N",
                        help="relax structures of up to N atoms (default 200; 0 = no limit); larger ones "
                        "are reported as not relaxed")
    parser.add_argument("--no-matching", action="store_true",
                        help="skip uniqueness and novelty (StructureMatcher over every pair of one formula: "
                        "hours for 1,000 structures of one element); reported as not assessed")
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
    if args.no_matching:
        overrides.append("evaluate.matching=false")
    if args.max_relax_atoms is not None:
        overrides.append(f"evaluate.max_relax_atoms={args.max_relax_atoms}")
    cfg = load_config(args.config, overrides).evaluate
    if cfg.max_relax_atoms < 0:
        from xtalgen.schema import ConfigError

        raise ConfigError(f"config key 'evaluate.max_relax_atoms' (--max-relax-atoms): must be >= 0 "
                          f"(0 = no limit), got {cfg.max_relax_atoms}")
    try:
        summary = run_evaluation(
            args.input, args.out, cfg, reference=args.reference, test_split=args.test_split,
            dataset=args.dataset, comp_scaler=args.comp_scaler, plots=not args.no_plots,
            progress=not args.no_progress, hull=args.hull or cfg.hull or None,
            allow_elements_only_hull=args.allow_elements_only_hull or cfg.allow_elements_only_hull,
        )
    except InputError as exc:
        print(f"xtalgen evaluate: error: {exc}", file=sys.stderr)
        return 2
    _print_summary(summary, Path(args.out))
    return 0


class InputError(ValueError):
    """An input, reference or hull path that cannot be used; reported in one line."""


def read_inputs(input_path: str | Path) -> list:
    """Every structure at `input_path`; InputError when there is nothing to evaluate."""
    from xtalgen.evaluation.inputs import iter_structures

    path = Path(input_path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    try:
        items = list(iter_structures(path))
    except (ValueError, OSError) as exc:
        raise InputError(str(exc)) from None
    if not items:
        raise InputError(f"{path} holds no structures to evaluate")
    return items


def _check_paths(**paths) -> None:
    for option, value in paths.items():
        if value is not None and not Path(value).exists():
            raise InputError(f"--{option.replace('_', '-')} {value} does not exist")


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
    hull: str | None = None,
    allow_elements_only_hull: bool = False,
) -> dict:
    """Everything `xtalgen evaluate` does; returns the summary written to summary.json.

    Raises InputError (before anything is written) when the input holds no structures or a path
    does not exist."""
    from xtalgen.evaluation.pipeline import RELAXED_KEY, evaluate_inputs, physical_band

    started = time.perf_counter()
    _check_paths(reference=reference, hull=hull, test_split=test_split, comp_scaler=comp_scaler)
    items = read_inputs(input_path)
    try:
        band, band_source = physical_band(reference, cfg)
    except (ValueError, OSError) as exc:
        raise InputError(f"--reference {reference}: {exc}") from None
    hull_file = None
    if hull is not None:
        from xtalgen.evaluation.hull import HullFile, default_cache_dir

        try:
            hull_file = HullFile.load(hull, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(), progress)
        except (ValueError, OSError) as exc:
            raise InputError(f"--hull {hull}: {exc}") from None
    out = Path(out_dir)
    # One evaluation at a time per --out: two would append to the same per-structure log.
    with DirectoryLock(out):  # creates out
        _check_resume_settings(out, cfg, band)
        rows, summary = evaluate_inputs(
            items, reference, cfg.relax, cfg=cfg, log_path=out / "per_structure.jsonl", progress=progress,
            hull=hull_file, allow_elements_only_hull=allow_elements_only_hull, volume_band=band,
        )
        summary["physical_volume_per_atom_band_source"] = band_source
        summary["input"] = str(input_path)
        summary["reference"] = str(reference) if reference else None
        summary["hull"] = str(hull) if hull else None
        if test_split:
            summary["cdvae"] = _cdvae(items, test_split, dataset, comp_scaler, cfg, progress)
        summary["seconds"] = round(time.perf_counter() - started, 3)
        _write_csv(rows, out / "per_structure.csv", exclude={RELAXED_KEY})
        (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2, sort_keys=True) + "\n")
        if plots:
            from xtalgen.evaluation.plots import write_plots

            summary["plots"] = [p.name for p in write_plots(rows, out, cfg.stability_threshold)]
        return summary


def _check_resume_settings(out: Path, cfg, band: tuple[float, float]) -> None:
    """The per-structure log is reused on a rerun; refuse to mix results made with other settings."""
    from xtalgen.evaluation.pipeline import two_pass_relaxation
    from xtalgen.schema import ConfigError

    settings = {k: getattr(cfg, k) for k in ("potential", "relax", "relax_steps", "relax_fmax", "symprec")}
    # Absent in one pass, so that a one-pass --out written before resumes. The refinement window and
    # the threshold may change: a rerun refines whatever is then due (and keeps what was refined).
    if cfg.relax and two_pass_relaxation(cfg):
        settings["relax_screen_fmax"] = cfg.relax_screen_fmax
    settings["physical_volume_per_atom_band"] = [round(float(b), 6) for b in band]
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


def summary_lines(summary: dict) -> list[str]:
    """The printed summary: rates with their counts, what was not assessed and why."""
    n = summary["num_structures"]

    def pct(key: str) -> str:
        value = summary.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "n/a"
        return f"{100 * value:.1f}%"

    def num(value, fmt: str = ".3g") -> str:
        return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)

    band = summary.get("physical_volume_per_atom_band")
    band_text = f"[{band[0]:.3g}, {band[1]:.3g}] Å³/atom, {summary.get('physical_volume_per_atom_band_source')}" if band else ""
    skipped = summary.get("not_evaluated_count", 0)
    if skipped:
        why = ", ".join(f"{reason} {count}" for reason, count in (summary.get("not_evaluated_reasons") or {}).items())
        first = (f"evaluated {n - skipped} of {n} structures in {summary.get('seconds', 0.0):.1f} s; "
                 f"not evaluated {skipped} ({why}; see not_evaluated in per_structure.csv)")
    else:
        first = f"evaluated {n} structures in {summary.get('seconds', 0.0):.1f} s"
    lines = [
        first,
        f"  physical cell {pct('physical_cell_rate')} (volume per atom in {band_text}; "
        f"median {num(summary.get('volume_per_atom_median'))}, max {num(summary.get('volume_per_atom_max'))} Å³/atom)",
        f"  valid {pct('valid_rate')} (structural {pct('struct_valid_rate')} incl. physical cell, "
        f"CDVAE structural {pct('struct_valid_cdvae_rate')}; compositional {pct('comp_valid_rate')})",
        f"  unique {pct('unique_rate')}   novel {pct('novel_rate')}",
    ]
    if "relaxed_count" in summary:
        reasons = summary.get("relax_failure_reasons") or {}
        failed = ", ".join(f"{reason} {count}" for reason, count in reasons.items())
        lines.append(f"  relaxed {summary['relaxed_count']} of {n} (converged {pct('relax_converged_rate')}); "
                     f"not relaxed {summary.get('relax_failures', 0)}" + (f": {failed}" if failed else ""))
        if summary.get("relax_mode") == "two-pass":
            lines.append(f"  two-pass relaxation: all to fmax {summary['relax_screen_fmax']} eV/Å, then "
                         f"{summary['refined_count']} with e_above_hull < {summary['refine_below_e_above_hull']:.3g} "
                         f"eV/atom to fmax {summary.get('relax_fmax')} eV/Å (`refined` in per_structure.csv)")
        lines.append(f"  RMSD generated -> relaxed (Å): median {num(summary.get('rmsd_median'))}  "
                     f"p90 {num(summary.get('rmsd_p90'))}  max {num(summary.get('rmsd_max'))}  "
                     f"mean {num(summary.get('mean_rmsd'))}")
    if "stability_assessed" in summary:
        if summary["stability_assessed"]:
            lines.append(f"  stable {pct('stable_rate')}   on/below hull {pct('on_or_below_hull_rate')}   "
                         f"SUN {pct('sun_rate')}   (hull: {summary.get('hull_source')})")
            if summary.get("stability_not_assessed_count"):
                lines.append(f"  not assessed (counted as not stable): {summary['stability_not_assessed_count']} of "
                             f"{n}, no compound of their chemical system in the hull")
        else:
            lines.append(f"  stable, SUN: not assessed ({summary.get('stability_not_assessed_reason')})")
    if "cdvae" in summary:
        c = summary["cdvae"]
        lines.append(f"  CDVAE ({c['dataset']}): COV-R {c['cov_recall']:.3f}  COV-P {c['cov_precision']:.3f}  "
                     f"wdist density {c['wdist_density']:.4f}  wdist #elements {c['wdist_num_elements']:.4f}")
    lines.extend(f"  note: {note}" for note in summary.get("notes", []))
    return lines


def _print_summary(summary: dict, out: Path) -> None:
    lines = summary_lines(summary)
    lines.append(f"outputs: {out}/per_structure.csv, {out}/summary.json")
    print("\n".join(lines), file=sys.stdout)
