"""Score-network training speed: xtalgen vs MatterGen 1.0.3 on the same real batches.

Each side does forward + backward of its own full training loss on identical structures:
  xtalgen    `CrystalDiffusion.loss(batch)["loss"].backward()` (corruption at random t, the preset's
             score network, the three weighted losses), in this process;
  MatterGen  `DiffusionModule.calc_loss(batch)` + backward with its default 44.6M GemNet-dT model,
             in `.venv-mattergen` (see benchmarks/mattergen/setup.sh), started with subprocess.
Both get the same CSV rows in the same batch order, reduced to the same cells (primitive + Niggli,
MatterGen's data preparation), CPU fp32, the same thread count. The first `--warmup` batches are
not timed. Optimizer steps are not included on either side (equal cost per parameter).

Prints one JSON line: structures/s (wall clock, and per CPU-second of the process, which is less
sensitive to a busy shared machine), both parameter counts, and xtalgen/MatterGen ratios.

Example:
  python benchmarks/score_net.py --dataset both --batch 32 --steps 3
  python benchmarks/score_net.py --dataset perov_5 --no-mattergen --profile   # where our time goes
  python benchmarks/score_net.py --mattergen-result previous.json   # re-time xtalgen only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pymatgen.core import Structure

from xtalgen.batch import CrystalBatch, collate
from xtalgen.models.diffusion import build_model
from xtalgen.models.score_net import count_parameters
from xtalgen.record import CrystalRecord
from xtalgen.schema import ModelConfig
from xtalgen.schema.model import ScoreNetConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
MATTERGEN_PYTHON = REPO / ".venv-mattergen" / "bin" / "python"
MATTERGEN_RUNNER = REPO / "benchmarks" / "mattergen" / "run_mattergen.py"
DATASETS = ("perov_5", "carbon_24")


def choose_rows(num_rows: int, count: int, seed: int) -> list[int]:
    """Distinct random rows, fixed by the seed; their order is the batch order on both sides."""
    if count > num_rows:
        raise SystemExit(f"asked for {count} structures, the file has {num_rows}")
    return [int(i) for i in np.random.default_rng(seed).choice(num_rows, size=count, replace=False)]


def load_records(csv_path: Path, rows: list[int]) -> list[CrystalRecord]:
    """The rows as records, in the cells MatterGen's data preparation makes (primitive, Niggli).

    Both networks must see exactly the same atoms: MatterGen reduces every CIF to its primitive
    cell before Niggli reduction, so the same pymatgen calls are made here.
    """
    frame = pd.read_csv(csv_path, index_col=0)
    records = []
    for row in rows:
        entry = frame.iloc[row]
        structure = Structure.from_str(entry["cif"], fmt="cif").get_primitive_structure()
        structure = structure.get_reduced_structure()
        records.append(
            CrystalRecord(
                id=str(entry["material_id"]),
                lattice=structure.lattice.matrix,
                frac_coords=structure.frac_coords % 1.0,
                atomic_numbers=np.array(structure.atomic_numbers),
            )
        )
    return records


def dataset_stats(records: list[CrystalRecord]) -> dict:
    """What a shard manifest would give the model: mean atomic density and the atom-count histogram."""
    density = float(np.mean([r.num_atoms / r.volume for r in records]))
    counts = np.bincount([r.num_atoms for r in records])
    return {"mean_density": density, "num_atoms_histogram": {n: int(c) for n, c in enumerate(counts) if c}}


def time_xtalgen(
    batches: list[CrystalBatch], stats: dict, preset: str, warmup: int, profile: bool
) -> dict:
    model = build_model(ModelConfig(score_net=ScoreNetConfig(preset=preset)), stats)
    model.train()
    seconds = cpu_seconds = 0.0
    structures = atoms = 0
    losses = []
    for step, batch in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model.loss(batch)["loss"]
        loss.backward()
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        model.zero_grad(set_to_none=True)
        print(f"[xtalgen] step {step}: {elapsed:.2f} s wall, {cpu_elapsed:.2f} s cpu, loss {loss.item():.3f}",
              file=sys.stderr)
        if step >= warmup:
            seconds += elapsed
            cpu_seconds += cpu_elapsed
            structures += batch.num_structures
            atoms += batch.num_atoms_total
            losses.append(loss.item())
    if profile:
        profile_step(model, batches[-1])
    timed = len(batches) - warmup
    return {
        "params": count_parameters(model.score_net),
        "structures_per_s": structures / seconds,
        "structures_per_cpu_s": structures / cpu_seconds,
        "atoms_per_s": atoms / seconds,
        "seconds_per_step": seconds / timed,
        "cpu_seconds_per_step": cpu_seconds / timed,
        "timed_steps": timed,
        "timed_atoms": atoms,
        "mean_loss": float(np.mean(losses)),
    }


def profile_step(model: torch.nn.Module, batch: CrystalBatch, rows: int = 25) -> None:
    """One forward + backward under torch.profiler; the top operators by self CPU time to stderr."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model.loss(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), file=sys.stderr)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows),
          file=sys.stderr)


def time_mattergen(csv_path: Path, rows: list[int], args: argparse.Namespace) -> dict:
    if not MATTERGEN_PYTHON.exists():
        raise SystemExit(f"{MATTERGEN_PYTHON} not found: run `bash benchmarks/mattergen/setup.sh` first")
    command = [
        str(MATTERGEN_PYTHON), str(MATTERGEN_RUNNER), "train",
        "--csv", str(csv_path), "--rows", ",".join(map(str, rows)),
        "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]
    # stderr passes through (progress per step); the last stdout line is the runner's JSON
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["structures_per_cpu_s"] = args.batch / report["cpu_seconds_per_step"]
    return report


def previous_mattergen(path: Path | None, name: str, rows: list[int]) -> dict | None:
    """MatterGen's figures for these exact rows from an earlier run's JSON line, if given.

    MatterGen's speed does not change with xtalgen's code, and it is the slow half (minutes per
    batch on 2 cores), so re-measuring xtalgen alone against a saved run is allowed, but only for
    identical rows, batch and step counts.
    """
    if path is None:
        return None
    previous = json.loads(Path(path).read_text().strip().splitlines()[-1])["datasets"].get(name)
    if previous is None or previous.get("rows") != rows or "mattergen" not in previous:
        raise SystemExit(f"{path} has no MatterGen run of {name} on these rows; run without --mattergen-result")
    return {**previous["mattergen"], "reused_from": str(path)}


def run_dataset(name: str, args: argparse.Namespace) -> dict:
    csv_path = args.data_dir / name / "val.csv"
    num_rows = len(pd.read_csv(csv_path, index_col=0, usecols=[0]))
    rows = choose_rows(num_rows, args.batch * (args.warmup + args.steps), args.seed)
    records = load_records(csv_path, rows)
    batches = [collate(records[i : i + args.batch]) for i in range(0, len(records), args.batch)]
    result = {
        "csv": f"{name}/val.csv",
        "rows": rows,
        "atoms_per_batch": [b.num_atoms_total for b in batches],
        "xtalgen": time_xtalgen(batches, dataset_stats(records), args.preset, args.warmup, args.profile),
    }
    if not args.no_mattergen:
        mattergen = previous_mattergen(args.mattergen_result, name, rows) or time_mattergen(csv_path, rows, args)
        if mattergen["timed_atoms"] != result["xtalgen"]["timed_atoms"]:
            raise SystemExit("the two sides saw different atoms; check the cell reduction")
        result["mattergen"] = mattergen
        result["speedup"] = result["xtalgen"]["structures_per_s"] / mattergen["structures_per_s"]
        result["speedup_cpu"] = (
            result["xtalgen"]["structures_per_cpu_s"] / mattergen["structures_per_cpu_s"]
        )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=[*DATASETS, "both"], default="both")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per dataset")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--preset", default="base", help="xtalgen score-network preset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--no-mattergen", action="store_true", help="time xtalgen only")
    parser.add_argument("--mattergen-result", type=Path,
                        help="reuse MatterGen's figures from this earlier output (same rows) instead of re-running it")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one xtalgen step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    names = DATASETS if args.dataset == "both" else (args.dataset,)
    results = {name: run_dataset(name, args) for name in names}
    summary = {
        "benchmark": "score_net_training",
        "what": "forward+backward of each framework's full diffusion training loss, CPU fp32",
        "batch": args.batch,
        "threads": args.threads,
        "xtalgen_preset": args.preset,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "peak_rss_gb_xtalgen": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "datasets": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
