"""`xtalgen quickstart`: the whole pipeline, small, on the embedded data, on a CPU, in minutes.

Runs the same commands a user runs, in order — so it is also the shortest tour of xtalgen:

  1. xtalgen shard build builtin:aflow --out OUT/shards      (AFLOW prototypes bundled in pymatgen)
  2. xtalgen shard stats OUT/shards
  3. xtalgen train debug data.shards=OUT/shards ...          (DeepSpeed, debug preset)
  4. xtalgen train consolidate OUT/run --out OUT/model.pt   (EMA weights, one file)
  5. xtalgen sample OUT/model.pt --out OUT/samples
  6. xtalgen evaluate OUT/samples --reference OUT/shards --out OUT/eval   (CHGNet, SUN)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

EPILOG = """examples:
  xtalgen quickstart                         # everything under ./quickstart
  xtalgen quickstart --out /tmp/qs --steps 100 --samples 8
  xtalgen quickstart --no-relax              # skip the CHGNet relaxation (fastest)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the whole pipeline on the embedded data (shards -> train -> sample -> evaluate)",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("quickstart"), help="output folder (default ./quickstart)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--samples", type=int, default=16, help="structures to sample (default 16)")
    parser.add_argument("--sample-steps", type=int, default=50, help="diffusion steps when sampling (default 50)")
    parser.add_argument("--no-relax", action="store_true", help="evaluate without CHGNet relaxation/stability")
    parser.set_defaults(func=run)


def _step(title: str, argv: list[str]) -> None:
    from xtalgen.cli import main

    print(f"\n==> {title}\n    xtalgen {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"quickstart: `xtalgen {' '.join(argv)}` failed with exit code {code}")


def run(args: argparse.Namespace) -> int:
    import torch

    # The debug network is small: one intra-op thread per process is as fast and leaves the second
    # core to the evaluation workers (measured: 2 threads on a busy 2-core machine were 10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # as it was for the caller (tests run the quickstart in-process)


def _run(args: argparse.Namespace) -> int:
    # W&B's own console lines (banner, sparkline history) would bury the pipeline's output; the run
    # is still recorded offline and the summary says where.
    os.environ.setdefault("WANDB_SILENT", "true")
    out: Path = args.out
    shards, run_dir, model, samples, evaluation = (
        out / "shards", out / "run", out / "model.pt", out / "samples", out / "eval"
    )
    start = time.perf_counter()
    if not (shards / "manifest.json").exists():
        _step("1/6 build shards from the embedded AFLOW prototypes",
              ["shard", "build", "builtin:aflow", "--out", str(shards), "--format", "lmdb", "--workers", "2"])
    _step("2/6 shard statistics", ["shard", "stats", str(shards)])
    _step("3/6 train the debug preset with DeepSpeed",
          ["train", "debug", f"data.shards={shards}", f"train.run_dir={run_dir}",
           f"train.max_steps={args.steps}", "train.resume=auto"])
    _step("4/6 consolidate the EMA weights into one model file",
          ["train", "consolidate", str(run_dir), "--out", str(model)])
    _step("5/6 sample new crystals",
          ["sample", str(model), "--out", str(samples), "--num-samples", str(args.samples),
           "--batch-size", str(args.samples), "--steps", str(args.sample_steps), "--seed", "0"])
    evaluate = ["evaluate", str(samples), "--reference", str(shards), "--out", str(evaluation)]
    _step("6/6 evaluate: validity, stability (CHGNet), uniqueness, novelty, SUN",
          evaluate + (["--no-relax"] if args.no_relax else []))
    _print_summary(out, run_dir, model, samples, evaluation, time.perf_counter() - start)
    return 0


LOSS_TERMS = (("loss", "total"), ("loss_lattice", "lattice"), ("loss_coords", "coordinates"), ("loss_types", "types"))


def _print_summary(out: Path, run_dir: Path, model: Path, samples: Path, evaluation: Path, seconds: float) -> None:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((evaluation / "summary.json").read_text())
    print(f"\n==> quickstart finished in {seconds:.0f} s")
    if metrics:
        # Single-step losses are noisy (random t per structure): compare the means of the first and
        # last fifth of the logged steps, term by term.
        k = max(1, len(metrics) // 5)
        print(f"    training loss, mean of the first -> last {k} logged steps (step {metrics[-1]['step']}):")
        for key, name in LOSS_TERMS:
            if key in metrics[0]:
                first = sum(r[key] for r in metrics[:k]) / k
                last = sum(r[key] for r in metrics[-k:]) / k
                note = "  (predicting zero: 1.0)" if key == "loss_lattice" else ""
                print(f"      {name:<12} {first:8.3f} -> {last:8.3f}{note}")
    for line in _sample_lines(samples) + _evaluation_lines(summary):
        print(f"    {line}")
    wandb_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    print(f"    run dir        {run_dir}  (config.yaml, metrics.jsonl, checkpoints/)")
    if wandb_dirs:
        print(f"    W&B (offline)  {wandb_dirs[-1]}  (upload later: wandb sync {wandb_dirs[-1]})")
    print(f"    model          {model}")
    print(f"    samples        {samples}  (cifs/, samples.extxyz, samples.jsonl)")
    print(f"    evaluation     {evaluation}  (per_structure.csv, summary.json, *.png)")
    print(f"    everything     {out}")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _sample_lines(samples: Path) -> list[str]:
    """Volume per atom of the sampled cells, as the sampler recorded them in samples.jsonl."""
    rows = [json.loads(line) for line in (samples / "samples.jsonl").read_text().splitlines() if line.strip()]
    volumes = sorted(r["volume_per_atom"] for r in rows if "volume_per_atom" in r)
    if not volumes:
        return []
    flagged = sum(1 for r in rows if r.get("physical_cell") is False)
    return [f"sampled cells  {len(volumes)}, volume per atom {volumes[0]:.1f} / {volumes[len(volumes) // 2]:.1f} / "
            f"{volumes[-1]:.1f} Å³ (min / median / max); {flagged} outside the sampler's band"]


def _evaluation_lines(summary: dict) -> list[str]:
    band = summary.get("physical_volume_per_atom_band")
    band_text = f" ({band[0]:.1f}-{band[1]:.1f} Å³/atom)" if band else ""
    lines = [f"{'physical cell':<14} {_pct(summary.get('physical_cell_rate'))}{band_text}"]
    for key, name in (("valid_rate", "valid"), ("unique_rate", "unique"), ("novel_rate", "novel")):
        lines.append(f"{name:<14} {_pct(summary.get(key))}")
    if "relax_failures" in summary:
        reasons = ", ".join(f"{n} {why}" for why, n in (summary.get("relax_failure_reasons") or {}).items())
        lines.append(f"{'relaxed':<14} {summary.get('relaxed_count', 0)} of {summary['num_structures']}; "
                     f"{summary['relax_failures']} not relaxed{f' ({reasons})' if reasons else ''}")
        if summary.get("rmsd_median") is not None:
            lines.append(f"{'RMSD (Å)':<14} median {summary['rmsd_median']:.3f}, p90 {summary['rmsd_p90']:.3f}, "
                         f"max {summary['rmsd_max']:.3f} (generated -> relaxed)")
    for key, name in (("stable_rate", "stable"), ("sun_rate", "SUN")):
        if summary.get("stability_assessed") is False:
            lines.append(f"{name:<14} not assessed ({summary.get('stability_not_assessed_reason')})")
        elif key in summary:
            lines.append(f"{name:<14} {_pct(summary.get(key))}")
    if summary.get("stability_not_assessed_count"):
        lines.append(f"{'':<14} ({summary['stability_not_assessed_count']} of {summary['num_structures']} not assessed: "
                     "no compound of their chemical system among the training structures; counted as not stable)")
    if summary.get("stable_rate") is not None and (summary.get("hull_source") or "").startswith("reference set"):
        lines.append(f"{'':<14} (hull: the {summary.get('reference_size')} training prototypes, a toy hull; "
                     "`xtalgen data download mp_hull` gives Materials Project's)")
    return lines
