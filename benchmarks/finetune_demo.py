"""Property fine-tuning, measured: adherence of conditioned samples against the unconditional base.

    python benchmarks/finetune_demo.py band_gap --base build/quality/perov_5/model.pt
    python benchmarks/finetune_demo.py chemical_system --base build/quality/perov_5/model.pt
    python benchmarks/finetune_demo.py space_group --base build/quality/carbon_24/model.pt --dataset carbon_24

The base is a model trained on a dataset's **val.csv** (`benchmarks/quality.py` makes one). Every
step is an `xtalgen` command a user would type (printed before it runs):

* band_gap (Perov-5): shards of val.csv with `dir_gap` as `dft_band_gap`; `xtalgen finetune` on
  subsets of `--labels` labelled structures (default 500, 1,500 and all); samples at a 3.0 eV
  target for each guidance scale γ (`--guidance`, default 0 1 2 4; the subsets other than the
  largest at γ = 2 only) and with the range `>= 3`; the unconditional base sampled alike. The
  samples are judged by a band-gap predictor fitted on val.csv (`band_gap_predictor.py`; its test
  MAE is reported): the fraction within ±0.5 eV of the target, and for the range, at or above 3,
  each against the base's fraction meeting the same target (a ratio with its 95 % interval). The
  target is rare in Perov-5 (0.5 % of val.csv), so `--base-count` samples the base more widely, e.g.
      python benchmarks/finetune_demo.py band_gap --base B --labels 500,1500 --guidance 2 \
          --count 600 --base-count 2000 --tag wide
* chemical_system (Perov-5): `xtalgen finetune` on every structure's chemical system; samples
  for chemical systems of test.csv that val.csv does not have; the fraction whose element set is
  exactly the requested one, and the fraction that also has a stoichiometry test.csv has for that
  system (a cation on an anion site makes the exact set, but no perovskite).
* space_group (Carbon-24 by default): shards with the space group computed by spglib; samples
  for the most common space groups of test.csv; the fraction with that space group (spglib,
  symprec 0.1). With `--wyckoff` every set (the fine-tuned model's and the base's) is sampled
  under the symmetry of val.csv structures of the requested group (`xtalgen sample --space-group G
  --templates val.csv`), and each sample is also matched (StructureMatcher) against the val.csv
  structures of its group and size, so a copy of the training data would show:
      python benchmarks/finetune_demo.py space_group --base B --wyckoff --guidance 1,2

chemical_system and space_group sample at γ = 2 unless `--guidance` lists others (one result row
per γ); `--steps`, `--sample-override KEY=VALUE` and `--tag` sample variants of one fine-tuned model
into directories of their own, e.g.
    python benchmarks/finetune_demo.py chemical_system --base B --guidance 1,1.5 --steps 200 --tag s200

Each result is one JSON line on stdout, also in WORK/results.jsonl; plots go to WORK/*.png. A rerun
resumes: finished fine-tunes and sample sets are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
XTALGEN = str(Path(sys.executable).parent / "xtalgen")
# The few-step sampler setting (README "Few steps"): same cost as the default at 50 steps.
FEW_STEPS = ["sample.coord_snr=0.8", "sample.time_power=2"]
GAP_TARGET, GAP_WINDOW = 3.0, 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("band_gap", "chemical_system", "space_group"))
    parser.add_argument("--base", required=True, help="unconditional model trained on the dataset's val.csv")
    parser.add_argument("--dataset", help="perov_5 (band_gap, chemical_system) or carbon_24 (space_group)")
    parser.add_argument("--work", help="working directory (default build/finetune/<dataset>)")
    parser.add_argument("--labels", default="500,1500,all", help="band_gap: subset sizes to fine-tune on")
    parser.add_argument("--guidance", help="guidance scales γ, comma-separated (band_gap: of the largest subset, "
                                           "default 0,1,2,4; chemical_system and space_group: default 2)")
    parser.add_argument("--count", type=int, default=300, help="samples per set")
    parser.add_argument("--base-count", type=int,
                        help="band_gap: samples of the unconditional base (default --count); a rare target "
                             "needs many to pin down the base's own fraction")
    parser.add_argument("--targets", type=int, default=8, help="chemical systems or space groups asked for")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--finetune-steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="fine-tuning learning rate (adapters start at zero and need a large one)")
    parser.add_argument("--jobs", type=int, default=2, help="commands run at once (one thread each)")
    parser.add_argument("--sample-override", action="append", default=[], metavar="KEY=VALUE",
                        help="chemical_system, space_group: an extra sampler setting (repeatable), e.g. "
                             "sample.corrector_steps=2; sample sets are then kept apart by --tag")
    parser.add_argument("--tag", default="", help="suffix of the sample directories and results of this variant")
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="chemical_system: another WORK directory whose results the plot shows beside these "
                             "(repeatable), e.g. a model fine-tuned otherwise")
    parser.add_argument("--wyckoff", action="store_true",
                        help="space_group: sample under templates of the requested group from val.csv "
                             "(tag 'wyckoff' unless --tag); the base is sampled so too")
    parser.add_argument("--full", action="store_true",
                        help="fine-tune every weight (finetune.full=true) instead of the adapters only")
    args = parser.parse_args()
    if (args.sample_override or args.steps != 50 or args.base_count) and not args.tag:
        parser.error("--sample-override, --steps and --base-count need a --tag "
                     "(the sample directories of another setting are kept)")
    if args.task == "band_gap" and args.sample_override:
        parser.error("--sample-override is for chemical_system and space_group")
    if args.wyckoff and args.task != "space_group":
        parser.error("--wyckoff is for space_group")
    if args.wyckoff:
        args.tag = args.tag or "wyckoff"
    args.guidance = args.guidance or ("0,1,2,4" if args.task == "band_gap" else "2")
    args.dataset = args.dataset or ("carbon_24" if args.task == "space_group" else "perov_5")
    work = Path(args.work or REPO / "build" / "finetune" / args.dataset)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    task = {"band_gap": band_gap, "chemical_system": chemical_system, "space_group": space_group}[args.task]
    task(args, work)
    return 0


# --- commands ------------------------------------------------------------------------------------------
def xtalgen(*argv: str) -> None:
    print("+ xtalgen " + " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run([XTALGEN, *argv], check=True)


def run_all(jobs: int, calls: list[tuple]) -> None:
    """Run independent xtalgen commands `jobs` at a time."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(xtalgen, *call) for call in calls]:
            future.result()


def shards(args, work: Path, *overrides: str) -> Path:
    out = work / "shards"
    if not (out / "manifest.json").exists():
        xtalgen("shard", "build", str(SHARED_DATA / args.dataset / "val.csv"), "--out", str(out), "--format", "lmdb",
                "shard.split=train", "validation.max_atoms=24", *overrides)
    return out


def finetune_call(args, recipe: str, shard_dir: Path, run_dir: Path, *overrides: str) -> tuple | None:
    if (run_dir / "summary.json").exists() and json.loads((run_dir / "summary.json").read_text())["status"] == "completed":
        return None
    resume = ["train.resume=auto"] if (run_dir / "checkpoints").exists() else []
    return ("finetune", args.base, recipe, f"data.shards={shard_dir}", f"train.run_dir={run_dir}",
            f"train.max_steps={args.finetune_steps}", "train.global_batch_structures=32",
            "train.micro_batch_structures=32", f"train.optim.lr={args.lr}", "train.ema_decay=0.99",
            "train.checkpoint_every=200", "train.log_every=25", *resume,
            *(["finetune.full=true"] if args.full else []), *overrides)


def model_of(run_dir: Path) -> Path:
    model = run_dir / "model.pt"
    if not model.exists():
        xtalgen("train", "consolidate", str(run_dir), "--out", str(model))
    return model


def sample_call(args, model: Path, out: Path, *extra: str, count: int | None = None) -> tuple:
    return ("sample", str(model), "--out", str(out), "--num-samples", str(count or args.count), "--batch-size", "50",
            "--steps", str(args.steps), "--no-progress", *FEW_STEPS, *extra)


def variant_sets(args, work: Path, prefix: str, model: Path, targets: list, condition, extra=lambda _: []) -> dict:
    """Sample calls keyed by (target, γ) for each γ of `--guidance`. The directory of γ = 2 with the
    default sampler keeps its plain name (`prefix_target`), so earlier results are reused.
    `extra(target)`: more arguments of that target's calls."""
    sets = {}
    for gamma in [g.strip() for g in args.guidance.split(",")]:
        suffix = "" if gamma == "2" and not args.tag else f"_g{gamma}" + (f"_{args.tag}" if args.tag else "")
        for target in targets:
            sets[target, gamma] = sample_call(args, model, work / f"{prefix}_{target}{suffix}",
                                              "--condition", condition(target), "--guidance", gamma,
                                              *args.sample_override, *extra(target),
                                              count=max(1, args.count // len(targets)))
    return sets


def read_samples(out: Path) -> tuple[list[dict], list]:
    from pymatgen.core import Structure

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return rows, [Structure.from_file(out / row["cif"]) for row in rows]


def emit(work: Path, row: dict) -> None:
    row = {**row, "machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row), flush=True)
    with open(work / "results.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")


def wilson(hits: int, total: int, z: float = 1.96) -> list[float]:
    """95 % Wilson interval of a fraction: honest error bars for a few hits in a few hundred."""
    if total == 0:
        return [0.0, 1.0]
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(max(0.0, float(centre - half)), 4), round(min(1.0, float(centre + half)), 4)]


def rate_ratio(hits: int, total: int, base_hits: int, base_total: int, z: float = 1.96) -> tuple:
    """Ratio of two fractions with its 95 % interval (Katz's log method). With no hits on one side,
    0.5 is added to each of the four cells (Haldane-Anscombe), so the ratio stays finite; with none on
    either side there is no ratio to give (None)."""
    if hits == 0 and base_hits == 0:
        return None, None
    a, n1, c, n2 = hits, total, base_hits, base_total
    if a == 0 or c == 0:
        a, n1, c, n2 = a + 0.5, n1 + 1.0, c + 0.5, n2 + 1.0
    ratio = (a / n1) / (c / n2)
    half = z * np.sqrt(1 / a - 1 / n1 + 1 / c - 1 / n2)
    return round(float(ratio), 2), [round(float(ratio * np.exp(-half)), 2), round(float(ratio * np.exp(half)), 2)]


def physical_rate(rows: list[dict]) -> float:
    return float(np.mean([r.get("physical_cell", True) for r in rows]))


# --- band gap ----------------------------------------------------------------------------------------------
def band_gap(args, work: Path) -> None:
    shard_dir = shards(args, work, "reader.properties=[{column: dir_gap, name: dft_band_gap}]")
    labels = [s.strip() for s in args.labels.split(",")]
    runs = {label: work / f"gap_{label}" for label in labels}
    calls = [finetune_call(args, "dft_band_gap", shard_dir, run_dir,
                           *([] if label == "all" else [f"finetune.max_labels={label}"]))
             for label, run_dir in runs.items()]
    run_all(args.jobs, [c for c in calls if c])
    models = {label: model_of(run_dir) for label, run_dir in runs.items()}

    guidance = [g.strip() for g in args.guidance.split(",")]
    largest = labels[-1]
    suffix = f"_{args.tag}" if args.tag else ""
    sets = {("base", "none", "-"): sample_call(args, Path(args.base), work / f"samples_base{suffix}",
                                               count=args.base_count)}
    for label, model in models.items():
        for gamma in guidance if label == largest else ["2"]:
            sets[(label, "=3.0", gamma)] = sample_call(args, model, work / f"samples_{label}_g{gamma}{suffix}",
                                                       "--condition", f"dft_band_gap={GAP_TARGET}", "--guidance", gamma)
        sets[(label, ">=3", "2")] = sample_call(args, model, work / f"samples_{label}_ge3{suffix}",
                                                "--condition", "dft_band_gap>=3", "--guidance", "2")
    run_all(args.jobs, list(sets.values()))

    sys.path.insert(0, str(Path(__file__).parent))
    from band_gap_predictor import fit_predictor, read_split

    start = time.perf_counter()
    predictor = fit_predictor(SHARED_DATA / args.dataset / "val.csv")
    test_structures, test_gaps = read_split(SHARED_DATA / args.dataset / "test.csv")
    test_pred = predictor.predict(test_structures)
    near = np.abs(test_gaps - GAP_TARGET) <= GAP_WINDOW
    emit(work, {"benchmark": "finetune_band_gap_predictor", "trained_on": "val.csv", "test": "test.csv",
                "mae_ev": round(float(np.abs(test_pred - test_gaps).mean()), 4),
                "mae_near_target_ev": round(float(np.abs(test_pred[near] - test_gaps[near]).mean()), 4),
                "test_within_window_true": round(float(near.mean()), 4),
                "test_within_window_predicted": round(float((np.abs(test_pred - GAP_TARGET) <= GAP_WINDOW).mean()), 4),
                "fit_seconds": round(time.perf_counter() - start, 1)})

    results = []
    for (label, target, gamma), call in sets.items():  # the base first
        out = Path(call[3])
        rows, structures = read_samples(out)
        gaps = predictor.predict(structures)
        within, at_least = int((np.abs(gaps - GAP_TARGET) <= GAP_WINDOW).sum()), int((gaps >= 3.0).sum())
        hits = at_least if target == ">=3" else within
        row = {"benchmark": "finetune_band_gap", "trained_on": "val.csv", "labels": label, "target": target,
               "guidance": gamma, "tag": args.tag, "count": len(rows), "hits": hits,
               "fraction": round(hits / len(rows), 4), "fraction_95ci": wilson(hits, len(rows)),
               "within_0.5ev_of_3": within, "at_least_3ev": at_least,
               "mean_predicted_gap": round(float(gaps.mean()), 3),
               "physical_rate": round(physical_rate(rows), 4), "steps": args.steps}
        if label != "base":  # against the base's fraction meeting the same target
            base = results[0][0]
            base_hits = base["at_least_3ev"] if target == ">=3" else base["within_0.5ev_of_3"]
            row["unconditional_hits"] = f"{base_hits}/{base['count']}"
            row["ratio_to_unconditional"], row["ratio_95ci"] = rate_ratio(hits, len(rows), base_hits, base["count"])
        results.append((row, gaps))
        emit(work, row)
    plot_band_gap(results, work / f"band_gap{suffix}.png")


def plot_band_gap(results: list[tuple[dict, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = np.linspace(0, 7, 36)
    for row, gaps in results:  # the base, and each model at γ = 2 (point target and range)
        if row["labels"] == "base" or row["guidance"] == "2":
            name = ("unconditional base" if row["labels"] == "base"
                    else f"{row['labels']} labels, {'≥ 3' if row['target'] == '>=3' else '3.0'} eV, γ=2")
            left.hist(gaps, bins=bins, weights=np.full(len(gaps), 1 / len(gaps)), histtype="step", linewidth=1.3,
                      label=f"{name} (n={row['count']})")
    left.axvspan(GAP_TARGET - GAP_WINDOW, GAP_TARGET + GAP_WINDOW, color="grey", alpha=0.15, label="target ±0.5 eV")
    left.set(xlabel="predicted band gap (eV)", ylabel="fraction of samples", yscale="log",
             title="Perov-5 (trained on val.csv): predicted band gap of samples")
    left.legend(fontsize=7)
    base = next(r for r, _ in results if r["labels"] == "base")
    right.axhline(base["fraction"], color="black", linestyle=":",
                  label=f"unconditional base within ±0.5 eV of 3.0 ({base['fraction']:.1%})")
    base_range = base["at_least_3ev"] / base["count"]
    right.axhline(base_range, color="black", linestyle="--", linewidth=0.8,
                  label=f"unconditional base ≥ 3 eV ({base_range:.1%})")
    for label in sorted({r["labels"] for r, _ in results if r["labels"] != "base"}, key=_label_order):
        for target, marker in (("=3.0", "o"), (">=3", "s")):
            points = sorted((float(r["guidance"]), r["fraction"], r["fraction_95ci"]) for r, _ in results
                            if r["labels"] == label and r["target"] == target)
            xs, ys, cis = zip(*points)
            errors = np.abs(np.array(cis).T - np.array(ys))
            shift = {"500": -0.08, "1500": 0.0}.get(label, 0.08) + (0.03 if target == ">=3" else 0.0)
            what = "within ±0.5 eV of 3.0" if target == "=3.0" else "≥ 3 eV, range target"
            right.errorbar(np.array(xs) + shift, ys, yerr=errors, marker=marker, capsize=3, linestyle="-" if
                           len(xs) > 1 else "none", label=f"{label} labels: {what}")
    right.set(xlabel="guidance scale γ", ylabel="fraction of samples meeting the target",
              title="adherence vs guidance (95 % Wilson intervals)")
    right.set_ylim(0, right.get_ylim()[1] * 1.35)  # room for the legend above the intervals
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label_order(label: str) -> float:
    return float("inf") if label == "all" else float(label)


# --- chemical system ---------------------------------------------------------------------------------------
def chemical_system(args, work: Path) -> None:
    import pandas as pd
    from pymatgen.core import Structure

    shard_dir = shards(args, work)
    run_dir = work / "chemsys"
    call = finetune_call(args, "chemical_system", shard_dir, run_dir)
    if call:
        xtalgen(*call)
    model = model_of(run_dir)

    from xtalgen.evaluation.properties import chemical_system as system_of  # the evaluator's judge

    def split(csv: str) -> list:
        return [Structure.from_str(c, fmt="cif") for c in pd.read_csv(SHARED_DATA / args.dataset / csv)["cif"]]

    test_structures = split("test.csv")
    seen, test = Counter(map(system_of, split("val.csv"))), Counter(map(system_of, test_structures))
    # A sceptical second count: the exact element set in a stoichiometry that test.csv has for that system
    # (all of Perov-5 is ABX3; one element per site type is not enough if a cation sits on an anion site).
    test_formulas = {}
    for structure in test_structures:
        test_formulas.setdefault(system_of(structure), set()).add(structure.composition.reduced_formula)
    unseen = sorted((s for s in test if s not in seen), key=lambda s: (-test[s], s))[: args.targets]
    sets = variant_sets(args, work, "samples_chemsys", model, unseen, lambda s: f"chemical_system={s}")
    run_all(args.jobs, list(sets.values()))
    for gamma in dict.fromkeys(g for _, g in sets):
        total_hits = total = total_inside = total_known = 0
        for system in unseen:
            rows, structures = read_samples(Path(sets[system, gamma][3]))
            made = [system_of(s) for s in structures]
            hits = sum(m == system for m in made)
            inside = sum(set(m.split("-")) <= set(system.split("-")) for m in made)  # no element not asked for
            known = sum(s.composition.reduced_formula in test_formulas[system] for s in structures)
            total_hits, total, total_inside = total_hits + hits, total + len(made), total_inside + inside
            total_known += known
            emit(work, {"benchmark": "finetune_chemical_system", "trained_on": "val.csv", "system": system,
                        "in_val": False, "guidance": float(gamma), "tag": args.tag, "count": len(made),
                        "exact": hits, "fraction": round(hits / len(made), 4), "only_requested_elements": inside,
                        "exact_in_a_test_stoichiometry": known, "most_common_made": Counter(made).most_common(2),
                        "physical_rate": round(physical_rate(rows), 4)})
        emit(work, {"benchmark": "finetune_chemical_system", "trained_on": "val.csv", "system": "all",
                    "targets": len(unseen), "count": total, "exact": total_hits, "fraction": round(total_hits / total, 4),
                    "fraction_95ci": wilson(total_hits, total), "only_requested_elements": total_inside,
                    "exact_in_a_test_stoichiometry": total_known, "stoichiometry_95ci": wilson(total_known, total),
                    "guidance": float(gamma), "steps": args.steps, "sampler": args.sample_override, "tag": args.tag,
                    "finetune_steps": args.finetune_steps, "lr": args.lr, "full": args.full})
    plot_chemical_system(work, args.baseline, work / "chemical_system.png")


def latest_totals(work: Path) -> dict:
    """The newest all-systems row of each (tag, γ) in WORK/results.jsonl."""
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    return {(r["tag"], r["guidance"]): r for r in rows
            if r["benchmark"] == "finetune_chemical_system" and r["system"] == "all" and "exact_in_a_test_stoichiometry" in r}


def has_element_set_gate(work: Path) -> bool:
    """Whether the fine-tuned model of WORK has a trained element-set gate (older ones predate it)."""
    import torch

    model = work / "chemsys" / "model.pt"
    if not model.exists():
        return False
    state = torch.load(model, map_location="cpu", weights_only=True)["state_dict"]
    gate = state.get("score_net.element_set_gate.bias")
    return gate is not None and bool(gate.count_nonzero())


def plot_chemical_system(work: Path, baselines: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for line, directory in zip(["-", "--", ":", "-."], [work, *baselines]):
        totals = latest_totals(directory)
        for tag in sorted({t for t, _ in totals}):
            points = sorted((g, r) for (t, g), r in totals.items() if t == tag)
            first = points[0][1]
            label = (f"{'full' if first.get('full') else 'adapters'}, {first['finetune_steps']} steps, "
                     f"{'with' if has_element_set_gate(directory) else 'no'} element-set gate "
                     f"({first['targets']} systems)")
            for axis, (hits, interval) in zip(axes, [("exact", "fraction_95ci"),
                                                     ("exact_in_a_test_stoichiometry", "stoichiometry_95ci")]):
                xs = [g for g, _ in points]
                ys = [r[hits] / r["count"] for _, r in points]
                errors = np.abs(np.array([r[interval] for _, r in points]).T - np.array(ys))
                axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, linestyle=line, label=label)
    axes[0].set(xlabel="guidance scale γ", ylabel="fraction of samples",
                title="exact element set (95 % Wilson intervals)")
    axes[1].set(xlabel="guidance scale γ", title="exact set in a stoichiometry test.csv has")
    for axis in axes:
        axis.axhline(0.9, color="grey", linewidth=0.8)
        axis.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle("Perov-5 (trained on val.csv): chemical systems of test.csv absent from val.csv")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- space group -------------------------------------------------------------------------------------------
def space_group(args, work: Path) -> None:
    import pandas as pd
    from pymatgen.core import Structure

    from xtalgen.evaluation.properties import space_group_number as number  # the evaluator's judge
    from xtalgen.evaluation.validity import min_interatomic_distance, structural_validity

    shard_dir = shards(args, work, "reader.compute_space_group=true")
    run_dir = work / "spacegroup"
    call = finetune_call(args, "space_group", shard_dir, run_dir)
    if call:
        xtalgen(*call)
    model = model_of(run_dir)

    val_csv = SHARED_DATA / args.dataset / "val.csv"
    frame = pd.read_csv(SHARED_DATA / args.dataset / "test.csv")
    test = Counter(number(Structure.from_str(c, fmt="cif")) for c in frame["cif"])
    groups = [g for g, _ in test.most_common() if g is not None][: args.targets]
    per_group = max(1, args.count // len(groups))

    def constrained(group) -> list[str]:
        return ["--space-group", str(group), "--templates", str(val_csv)] if args.wyckoff else []

    sets = variant_sets(args, work, "samples_sg", model, groups, lambda g: f"space_group={g}",
                        extra=constrained)
    base_dir = work / ("samples_sg_base" + (f"_{args.tag}" if args.tag else ""))
    base_sets = {None: sample_call(args, Path(args.base), base_dir, *args.sample_override, count=per_group * len(groups))}
    if args.wyckoff:  # the base under the same templates: what the constraint does without any fine-tuning
        base_sets = {g: sample_call(args, Path(args.base), Path(f"{base_dir}_{g}"), *args.sample_override,
                                    *constrained(g), count=per_group) for g in groups}
    run_all(args.jobs, [*sets.values(), *base_sets.values()])
    base_structures = [s for call in base_sets.values() for s in read_samples(Path(call[3]))[1]]
    base_groups = Counter(number(s) for s in base_structures)
    reference = val_by_group_and_size(val_csv, number) if args.wyckoff else None
    labelled = [(gamma, {g: Path(sets[g, gamma][3]) for g in groups}) for gamma in dict.fromkeys(g for _, g in sets)]
    if args.wyckoff:
        labelled.append(("base", {g: Path(base_sets[g][3]) for g in groups}))
    outcomes = {}  # (set label, group) -> counts for the plot
    for gamma, directories in labelled:
        total_hits = total = 0
        copies, kept = [], []
        for group in groups:
            rows, structures = read_samples(directories[group])
            made = [number(s) for s in structures]
            hits = sum(m == group for m in made)
            total_hits, total = total_hits + hits, total + len(made)
            extra = {}
            if reference is not None:
                copied = [copy_of_training(s, reference.get((group, primitive_size(s)), [])) for s in structures]
                valid = [structural_validity(s).valid and row.get("physical_cell", True)
                         for s, row in zip(structures, rows)]
                new_hits = [m == group and v and not c for m, v, c in zip(made, valid, copied)]
                copies, kept = copies + copied, kept + new_hits
                outcomes[gamma, group] = {"new": sum(new_hits), "copy": sum(m == group and c for m, c in zip(made, copied)),
                                          "invalid": sum(m == group and not v and not c
                                                         for m, v, c in zip(made, valid, copied)),
                                          "other": len(made) - hits}
                extra = {"copies_of_val": sum(copied), "valid": sum(valid), "exact_valid_new": sum(new_hits),
                         "shortest_distance_median": round(float(np.median(
                             [min_interatomic_distance(s) for s in structures])), 3)}
            emit(work, {"benchmark": "finetune_space_group", "trained_on": "val.csv", "space_group": group,
                        "guidance": gamma if gamma == "base" else float(gamma), "tag": args.tag, "count": len(made),
                        "exact": hits, "fraction": round(hits / len(made), 4),
                        "unconditional_fraction": round(base_groups[group] / len(base_structures), 4),
                        "made": Counter(made).most_common(3), "physical_rate": round(physical_rate(rows), 4), **extra})
        emit(work, {"benchmark": "finetune_space_group", "trained_on": "val.csv", "space_group": "all",
                    "targets": len(groups), "count": total, "exact": total_hits,
                    "fraction": round(total_hits / total, 4), "fraction_95ci": wilson(total_hits, total),
                    "unconditional_groups": base_groups.most_common(5),
                    "guidance": gamma if gamma == "base" else float(gamma),
                    "steps": args.steps, "sampler": args.sample_override, "tag": args.tag, "wyckoff": args.wyckoff,
                    "finetune_steps": args.finetune_steps, "lr": args.lr, "symprec": 0.1,
                    **({"copies_of_val": sum(copies), "exact_valid_new": sum(kept),
                        "exact_valid_new_95ci": wilson(sum(kept), total)} if reference is not None else {})})
    if outcomes:
        plot_space_group(outcomes, groups, work / f"space_group_{args.tag}.png")


def plot_space_group(outcomes: dict, groups: list, path: Path) -> None:
    """Per requested group and sample set: requested group and valid and new / a copy of val.csv /
    not valid / another group (a supergroup, or none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, _ in outcomes))
    kinds = [("new", "requested group, valid, new", "tab:green"), ("copy", "requested group, copy of val.csv", "tab:orange"),
             ("invalid", "requested group, not valid", "tab:red"), ("other", "another group", "tab:grey")]
    fig, axis = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        xs = np.arange(len(groups)) + (j - (len(labels) - 1) / 2) * width
        bottom = np.zeros(len(groups))
        for key, name, colour in kinds:
            counts = np.array([outcomes[label, g][key] / sum(outcomes[label, g].values()) for g in groups])
            axis.bar(xs, counts, width * 0.95, bottom=bottom, color=colour, edgecolor="white", linewidth=0.3,
                     label=name if j == 0 else None)
            bottom += counts
        for x in xs:
            axis.text(x, 1.01, "base" if label == "base" else f"γ{label}", ha="center", fontsize=6)
    axis.set_xticks(np.arange(len(groups)), [f"SG {g}" for g in groups])
    axis.set(ylabel="fraction of samples", ylim=(0, 1.08),
             title="Carbon-24 (trained on val.csv), sampled under val.csv templates of each space group")
    fig.legend(fontsize=8, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def val_by_group_and_size(val_csv: Path, number) -> dict:
    """{(space group, atoms in the primitive cell): [val.csv structures]}: what a sample of that
    group and size could be a copy of (the templates are primitive cells; val.csv's need not be)."""
    import pandas as pd
    from pymatgen.core import Structure

    found: dict = {}
    for cif in pd.read_csv(val_csv)["cif"]:
        structure = Structure.from_str(cif, fmt="cif")
        found.setdefault((number(structure), primitive_size(structure)), []).append(structure)
    return found


def primitive_size(structure) -> int:
    return len(structure.get_primitive_structure(tolerance=0.1))


def copy_of_training(structure, candidates: list) -> bool:
    """Does the sample match a training structure (StructureMatcher with the evaluator's settings)?"""
    from xtalgen.evaluation.matching import MatchSettings

    matcher = MatchSettings().matcher()
    return any(matcher.fit(structure, other) for other in candidates)



if __name__ == "__main__":
    sys.exit(main())
