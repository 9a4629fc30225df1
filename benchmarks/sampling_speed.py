"""Sampling speed: seconds per structure, xtalgen's sampler vs MatterGen 1.0.3's, same machine and sizes.

xtalgen: `xtalgen.models.sampler.sample` (predictor + 1 Langevin corrector step per step, i.e. two
network evaluations per step, unconditional) for each preset and step count. MatterGen: its
default sampler (sampling_conf/default.yaml: 1000 steps + 1 corrector step, guidance 0) with its
44.6M GemNet-dT, in `.venv-mattergen` (benchmarks/mattergen/setup.sh). Random weights on both
sides: cost does not depend on the weights' values.

Every step costs the same (two network evaluations on a graph capped at 50 neighbours per atom),
so long runs are measured by running a short schedule over the same t range and scaling by the
step count. Each preset is first probed with `--probe-steps`; step counts whose full run would
take at most `--full-run-budget` seconds are then run for real. Each entry says which it is
(`measured_steps` = steps actually run).

Prints one JSON line; `speedup` = MatterGen's seconds per structure at its defaults / ours.

Example:
  python benchmarks/sampling_speed.py --presets debug,base --steps 50,100,250,1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from xtalgen.models.diffusion import build_model
from xtalgen.models.sampler import sample
from xtalgen.models.score_net import count_parameters
from xtalgen.schema import ModelConfig
from xtalgen.schema.model import ScoreNetConfig

REPO = Path(__file__).resolve().parents[1]
MATTERGEN_PYTHON = REPO / ".venv-mattergen" / "bin" / "python"
MATTERGEN_RUNNER = REPO / "benchmarks" / "mattergen" / "run_mattergen.py"
# Alex-MP-20's mean atomic density (DESIGN §4): where the lattice prior starts; shapes do not change.
MEAN_DENSITY = 0.0577


def timed_sample(model, num_atoms: torch.Tensor, num_steps: int, seed: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one sampling run."""
    generator = torch.Generator().manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = sample(model, num_atoms, num_steps=num_steps, corrector_steps=1, generator=generator)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if not torch.isfinite(out.frac_coords).all() or not torch.isfinite(out.lattice).all():
        raise SystemExit("xtalgen sampler produced non-finite structures")
    return wall, cpu


def time_xtalgen(preset: str, num_atoms: torch.Tensor, args: argparse.Namespace) -> dict:
    histogram = {int(n): int((num_atoms == n).sum()) for n in num_atoms.unique()}
    stats = {"mean_density": MEAN_DENSITY, "num_atoms_histogram": histogram}
    model = build_model(ModelConfig(score_net=ScoreNetConfig(preset=preset)), stats).eval()
    count = num_atoms.numel()
    timed_sample(model, num_atoms, 1, args.seed)  # warm-up, untimed
    probe_wall, probe_cpu = timed_sample(model, num_atoms, args.probe_steps, args.seed)
    per_step_wall = probe_wall / args.probe_steps
    entries = {}
    for steps in args.steps:
        if steps * per_step_wall <= args.full_run_budget:
            wall, cpu = timed_sample(model, num_atoms, steps, args.seed)
            measured = steps
        else:
            wall, cpu = probe_wall * steps / args.probe_steps, probe_cpu * steps / args.probe_steps
            measured = args.probe_steps
        entries[str(steps)] = {
            "seconds_per_structure": wall / count,
            "cpu_seconds_per_structure": cpu / count,
            "measured_steps": measured,
        }
        print(f"[xtalgen {preset}] {steps} steps: {wall / count:.3f} s/structure (ran {measured})",
              file=sys.stderr)
    return {"params": count_parameters(model.score_net), "by_steps": entries}


def time_mattergen(num_atoms: list[int], args: argparse.Namespace) -> dict:
    if not MATTERGEN_PYTHON.exists():
        raise SystemExit(f"{MATTERGEN_PYTHON} not found: run `bash benchmarks/mattergen/setup.sh` first")
    command = [
        str(MATTERGEN_PYTHON), str(MATTERGEN_RUNNER), "sample",
        "--num-atoms", ",".join(map(str, num_atoms)),
        "--sample-steps", str(args.mattergen_probe_steps), "--full-steps", "1000",
        "--threads", str(args.threads), "--seed", str(args.seed),
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["cpu_seconds_per_structure_full"] = (
        report["cpu_seconds_per_step"] * report["full_steps"] / report["structures"]
    )
    return report


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="debug,base", help="comma-separated xtalgen presets")
    parser.add_argument("--steps", type=int_list, default=[50, 100, 250, 1000], help="step counts")
    parser.add_argument("--num-atoms", type=int_list, default=[8, 8, 12, 12, 16, 16, 20, 20],
                        help="atoms of each structure in the batch (both sides)")
    parser.add_argument("--probe-steps", type=int, default=5, help="short run that sets the per-step cost")
    parser.add_argument("--full-run-budget", type=float, default=60.0,
                        help="run a step count for real when it should take at most this many seconds")
    parser.add_argument("--mattergen-probe-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mattergen", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    num_atoms = torch.tensor(args.num_atoms, dtype=torch.long)
    ours = {preset: time_xtalgen(preset, num_atoms, args) for preset in args.presets.split(",")}
    summary = {
        "benchmark": "sampling_speed",
        "what": "seconds per generated structure, predictor + 1 corrector step (2 network evaluations/step)",
        "num_atoms": args.num_atoms,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "xtalgen": ours,
    }
    if not args.no_mattergen:
        mattergen = time_mattergen(args.num_atoms, args)
        reference = mattergen["seconds_per_structure_full"]
        summary["mattergen"] = mattergen
        summary["speedup"] = {
            preset: {steps: reference / e["seconds_per_structure"] for steps, e in result["by_steps"].items()}
            for preset, result in ours.items()
        }
        cpu_reference = mattergen["cpu_seconds_per_structure_full"]
        summary["speedup_cpu"] = {
            preset: {steps: cpu_reference / e["cpu_seconds_per_structure"] for steps, e in result["by_steps"].items()}
            for preset, result in ours.items()
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
