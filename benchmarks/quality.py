"""Sample quality on Perov-5 or Carbon-24, one command: shards -> train (CPU time budget) -> sample -> evaluate.

    python benchmarks/quality.py --dataset perov_5
    python benchmarks/quality.py --dataset carbon_24 --train-minutes 30 --sampling 50:500,200:200

What it does, with the same `xtalgen` commands a user types (each printed before it runs):
  1. shards from the dataset's **val.csv** (the training split is not on these machines; every
     figure is labelled "trained on val.csv");
  2. `xtalgen train` of a preset for a CPU time budget, in chunks resumed exactly with
     `train.resume=auto` until the budget is spent (default 60 min, one thread);
  3. the EMA model consolidated, then sampled at each `--sampling STEPS:COUNT` setting
     (default 50:1000, 200:1000, 1000:200);
  4. each sample set evaluated against **test.csv** with the CDVAE metrics (validity, COV-R/COV-P,
     Wasserstein distances of density and number of elements) and novelty against the training
     shards; the first `--sun-count` structures of the first setting are also relaxed with CHGNet for
     stability and SUN against the training set's hull;
  5. PNG plots: each loss term against step; density, number of elements and space group, sampled
     against test.

Writes WORK/quality.json and prints it as one JSON line. Re-running resumes: finished stages are
kept (shards, training chunks, sample sets and evaluations all resume).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
XTALGEN = str(Path(sys.executable).parent / "xtalgen")
DATASET_MAX_ATOMS = {"perov_5": 20, "carbon_24": 24}
LOSS_TERMS = ("loss", "loss_lattice", "loss_coords", "loss_types")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASET_MAX_ATOMS), required=True)
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="folder holding DATASET/val.csv and test.csv")
    parser.add_argument("--work", type=Path, help="working folder (default build/quality/DATASET)")
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--train-minutes", type=float, default=60.0, help="training budget, wall minutes")
    parser.add_argument("--chunk-steps", type=int, default=1000, help="steps per resumed training chunk")
    parser.add_argument("--batch", type=int, default=32, help="structures per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--sampling", default="50:1000,200:1000,1000:200", help="STEPS:COUNT,...")
    parser.add_argument("--sun-count", type=int, default=100, help="structures relaxed for SUN (0: none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-matching", action="store_true",
                        help="sample sets: no uniqueness/novelty (default for carbon_24, where every structure "
                        "has one formula and StructureMatcher over all pairs takes hours; CDVAE reports neither)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra `xtalgen train` overrides")
    args = parser.parse_args()

    val, test = args.data / args.dataset / "val.csv", args.data / args.dataset / "test.csv"
    for path in (val, test):
        if not path.exists():
            print(f"error: {path} not found (pass --data)", file=sys.stderr)
            return 2
    work = args.work or REPO / "build" / "quality" / args.dataset
    work.mkdir(parents=True, exist_ok=True)
    settings = [tuple(int(x) for x in item.split(":")) for item in args.sampling.split(",") if item]
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    shards, run_dir, model = work / "shards", work / "run", work / "model.pt"
    if not (shards / "manifest.json").exists():
        _xtalgen("shard", "build", str(val), "--out", str(shards), "--format", "lmdb", "--workers", str(args.workers),
                 "shard.split=train", f"validation.max_atoms={DATASET_MAX_ATOMS[args.dataset]}")
    train_minutes = _train(args, shards, run_dir)
    _xtalgen("train", "consolidate", str(run_dir), "--out", str(model))

    results = {"benchmark": "quality", "dataset": args.dataset, "trained_on": f"{args.dataset}/val.csv",
               "evaluated_on": f"{args.dataset}/test.csv", "preset": args.preset,
               "train_minutes": round(train_minutes, 1), "train_steps": _last_step(run_dir),
               "losses": _loss_summary(run_dir), "settings": []}
    for steps, count in settings:
        samples, evaluation = work / f"samples_{steps}", work / f"eval_{steps}"
        started = time.perf_counter()
        _xtalgen("sample", str(model), "--out", str(samples), "--num-samples", str(count),
                 "--batch-size", str(min(count, 250)), "--steps", str(steps), "--seed", "0")
        seconds = round(time.perf_counter() - started, 1)  # includes start-up; a resumed set: the rest only
        matching = () if not (args.no_matching or args.dataset == "carbon_24") else ("--no-matching",)
        _xtalgen("evaluate", str(samples), "--reference", str(shards), "--test-split", str(test),
                 "--dataset", args.dataset, "--out", str(evaluation), "--no-relax", "--workers", str(args.workers),
                 *matching)
        summary = json.loads((evaluation / "summary.json").read_text())
        results["settings"].append(_setting_row(steps, count, summary, seconds))
    if args.sun_count and settings:
        results["sun"] = _sun(args, work, shards, settings[0][0])

    from xtalgen.evaluation.plots import _pyplot  # noqa: F401  (matplotlib with the Agg backend)
    results["plots"] = [str(p.relative_to(work)) for p in (
        _plot_losses(run_dir, work / "losses.png"),
        _plot_distributions(work / f"samples_{settings[0][0]}", test, work / "distributions.png", args.dataset),
    )]
    (work / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    return 0


def _xtalgen(*argv: str) -> None:
    print(f"\n==> xtalgen {' '.join(argv)}", flush=True)
    code = subprocess.call([XTALGEN, *argv])
    if code != 0:
        raise SystemExit(f"`xtalgen {' '.join(argv)}` failed with exit code {code}")


def _train(args, shards: Path, run_dir: Path) -> float:
    """Train in resumed chunks until the budget is spent; returns the minutes spent (this call)."""
    budget = args.train_minutes * 60
    start = time.perf_counter()
    step = _last_step(run_dir)
    while time.perf_counter() - start < budget:
        chunk_start, first = time.perf_counter(), step
        step += args.chunk_steps
        _xtalgen("train", args.preset, f"data.shards={shards}", f"train.run_dir={run_dir}",
                 f"train.max_steps={step}", "train.resume=auto", "train.optim.scheduler=constant",
                 f"train.optim.lr={args.lr}", f"train.global_batch_structures={args.batch}",
                 f"train.micro_batch_structures={args.batch}", "train.ema_decay=0.999",
                 "train.checkpoint_every=500", "train.log_every=25", *args.overrides)
        rate = (step - first) / max(time.perf_counter() - chunk_start, 1e-9)
        remaining = budget - (time.perf_counter() - start)
        if remaining < args.chunk_steps / rate / 4:  # a chunk would overrun by most of itself: stop here
            break
    return (time.perf_counter() - start) / 60


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_step(run_dir: Path) -> int:
    rows = _metrics(run_dir)
    return int(rows[-1]["step"]) if rows else 0


def _loss_summary(run_dir: Path) -> dict:
    """Each loss term, mean of the first and the last tenth of the logged steps."""
    rows = _metrics(run_dir)
    k = max(1, len(rows) // 10)
    return {term: [round(sum(r[term] for r in part) / len(part), 4) for part in (rows[:k], rows[-k:])]
            for term in LOSS_TERMS if rows and term in rows[0]}


def _setting_row(steps: int, count: int, summary: dict, seconds) -> dict:
    cdvae = summary.get("cdvae") or {}
    return {
        "steps": steps, "count": count,
        "physical_cell_rate": summary.get("physical_cell_rate"),
        "struct_validity": cdvae.get("struct_validity"), "comp_validity": cdvae.get("comp_validity"),
        "cov_recall": cdvae.get("cov_recall"), "cov_precision": cdvae.get("cov_precision"),
        "wdist_density": cdvae.get("wdist_density"), "wdist_num_elements": cdvae.get("wdist_num_elements"),
        "unique_rate": summary.get("unique_rate"), "novel_rate": summary.get("novel_rate"),
        "sampling_seconds": seconds,
    }


def _sun(args, work: Path, shards: Path, steps: int) -> dict:
    """Relax the first `sun_count` samples of a setting with CHGNet: stability and SUN vs the training hull."""
    subset = work / f"sun_input_{steps}"
    if not subset.exists():
        cifs = sorted((work / f"samples_{steps}" / "cifs").glob("*.cif"))[: args.sun_count]
        subset.mkdir()
        for cif in cifs:
            (subset / cif.name).write_bytes(cif.read_bytes())
    out = work / f"sun_{steps}"
    _xtalgen("evaluate", str(subset), "--reference", str(shards), "--out", str(out),
             "--workers", str(args.workers), "evaluate.relax_fmax=0.1")
    summary = json.loads((out / "summary.json").read_text())
    keys = ("num_structures", "physical_cell_rate", "relaxed_count", "relax_failures", "stable_rate",
            "on_or_below_hull_rate", "unique_rate", "novel_rate", "sun_rate", "rmsd_median", "hull_source")
    return {"steps": steps, **{k: summary.get(k) for k in keys}}


def _plot_losses(run_dir: Path, path: Path) -> Path:
    from xtalgen.evaluation.plots import _pyplot, _save

    plt = _pyplot()
    rows = _metrics(run_dir)
    fig, axes = plt.subplots(1, len(LOSS_TERMS), figsize=(4 * len(LOSS_TERMS), 3.2))
    steps = [r["step"] for r in rows]
    for ax, term in zip(axes, LOSS_TERMS):
        ax.plot(steps, [r[term] for r in rows], lw=0.6)
        ax.set_title(term)
        ax.set_xlabel("step")
        if term == "loss_lattice":
            ax.axhline(1.0, color="grey", ls="--", lw=0.8, label="predict-zero level")
            ax.legend(fontsize=7)
    fig.suptitle(f"training losses ({len(rows)} logged steps)")
    fig.tight_layout()
    return _save(fig, path)


def _structure_stats(structures) -> dict:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    density, elements, groups = [], [], []
    for s in structures:
        density.append(s.density)
        elements.append(len(s.composition.elements))
        try:
            groups.append(SpacegroupAnalyzer(s, symprec=0.1).get_space_group_number())
        except Exception:  # spglib gives up on some distorted cells: no space group for them
            groups.append(0)
    return {"density": density, "elements": elements, "groups": groups}


def _plot_distributions(samples: Path, test_csv: Path, path: Path, dataset: str) -> Path:
    import pandas as pd
    from pymatgen.core import Structure

    from xtalgen.evaluation.plots import _pyplot, _save

    warnings.filterwarnings("ignore")
    paths = sorted((samples / "cifs").glob("*.cif")) or sorted(samples.glob("*.cif"))  # a sample dir or CIFs
    if not paths:
        raise SystemExit(f"no CIF files in {samples} or {samples / 'cifs'}")
    sampled = [Structure.from_file(p) for p in paths]
    tested = [Structure.from_str(c, fmt="cif") for c in pd.read_csv(test_csv)["cif"]]
    stats = {"sampled": _structure_stats(sampled), "test.csv": _structure_stats(tested)}
    counts = {"sampled": len(sampled), "test.csv": len(tested)}
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, colour in (("test.csv", "grey"), ("sampled", "tab:blue")):
        label = f"{name} (n = {counts[name]})"
        axes[0].hist(stats[name]["density"], bins=40, range=(0, 12), density=True, alpha=0.5, color=colour, label=label)
        axes[1].hist(stats[name]["elements"], bins=range(1, 8), density=True, alpha=0.5, color=colour, label=label,
                     align="left")
        groups = pd.Series(stats[name]["groups"]).value_counts(normalize=True).sort_index()
        axes[2].bar(groups.index.astype(int), groups.values, width=2.5, alpha=0.5, color=colour, label=label)
    for ax, title in zip(axes, ("density (g/cm³)", "number of elements", "space group (spglib, symprec 0.1; 0 = none)")):
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{dataset}: sampled vs test.csv (trained on val.csv)")
    fig.tight_layout()
    return _save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
