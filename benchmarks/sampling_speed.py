"""Sampling speed: seconds per structure, xtalgen's sampler vs MatterGen 1.0.3's, same machine and sizes.

xtalgen: `xtalgen.models.sampler.sample` (predictor + 1 Langevin corrector step per step, i.e. two
network evaluations per step, unconditional) for each preset and step count. MatterGen: its
default sampler (sampling_conf/default.yaml: 1000 steps + 1 corrector step, guidance 0) with its
44.6M GemNet-dT, in `.venv-mattergen` (benchmarks/mattergen/setup.sh). Random weights on both
sides: cost does not depend on the weights' values.

Every step costs the same (two network evaluations on a graph capped at 50 neighbours per atom,
plus the predictor/corrector arithmetic), so seconds per structure = (seconds per step) x steps /
structures, with the per-step cost measured over `--probe-steps` steps spread over t in [eps, 1].
Random weights make the Langevin corrector diverge within a few steps (its step size grows as
1/|score|^2), emptying the graph and making later steps artificially cheap; so on both sides each
measured step starts from a prior draw, whose graph has the size a trained model's states have.

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

from xtalgen.models.diffusion import NoisyCrystals, build_model
from xtalgen.models.graph import radius_graph_pbc
from xtalgen.models.sampler import SAMPLING_EPS_T, corrector_step, guided_prediction, predictor_step
from xtalgen.models.score_net import count_parameters
from xtalgen.schema import ModelConfig
from xtalgen.schema.model import ScoreNetConfig

REPO = Path(__file__).resolve().parents[1]
MATTERGEN_PYTHON = REPO / ".venv-mattergen" / "bin" / "python"
MATTERGEN_RUNNER = REPO / "benchmarks" / "mattergen" / "run_mattergen.py"
# Alex-MP-20's mean atomic density (DESIGN §4): where the lattice prior starts; shapes do not change.
MEAN_DENSITY = 0.0577


def prior_state(model, num_atoms: torch.Tensor, generator: torch.Generator) -> NoisyCrystals:
    """A batch drawn from the prior, exactly as `sample` starts (all atoms masked)."""
    total = int(num_atoms.sum())
    batch_index = torch.repeat_interleave(torch.arange(num_atoms.numel()), num_atoms)
    return NoisyCrystals(
        model.types.prior(total, model.device),
        model.coords.prior(total, generator=generator, device=model.device, dtype=model.dtype),
        model.lattice.prior(num_atoms, generator=generator, dtype=model.dtype),
        num_atoms,
        batch_index,
    )


@torch.no_grad()
def time_steps(model, num_atoms: torch.Tensor, steps: int, seed: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `steps` sampler steps, each the work `sample` does per step.

    A step is: network evaluation + Langevin corrector update, network evaluation + ancestral
    predictor update, with the sampler's own functions. Every step starts again from the prior
    state: with random weights the Langevin step size 2 (snr |z| / |score|)^2 explodes, cells
    blow up within a few steps and the graph empties, which would make later steps nearly free.
    A trained model keeps the atomic density near the prior's, so its graphs have the prior's
    size (50 neighbours per atom at 7 Å): the per-step work measured here.
    """
    generator = torch.Generator().manual_seed(seed)
    x = prior_state(model, num_atoms, generator)
    times = torch.linspace(1.0, SAMPLING_EPS_T, steps + 1).tolist()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
        t = torch.full((num_atoms.numel(),), times[i], dtype=model.dtype)
        t_next = torch.full_like(t, times[i + 1])
        pred = guided_prediction(model, x, t, None, 1.0)
        corrected = corrector_step(model, x, pred, t, t_next, 0.4, 0.2, generator)
        pred = guided_prediction(model, x, t, None, 1.0)
        predicted = predictor_step(model, x, pred, t, t_next, False, generator)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    for state in (corrected, predicted):
        if not torch.isfinite(state.frac_coords).all():
            raise SystemExit("xtalgen sampler step produced non-finite coordinates")
    return wall, cpu


def edges_per_evaluation(model, num_atoms: torch.Tensor, seed: int) -> int:
    x = prior_state(model, num_atoms, torch.Generator().manual_seed(seed))
    cart = torch.einsum("ni,nij->nj", x.frac_coords, x.lattice[x.batch_index])
    graph = radius_graph_pbc(cart, x.lattice, x.batch_index, x.num_atoms, model.score_net.cutoff,
                             model.score_net.max_neighbors)
    return int(graph.edge_index.shape[1])


def time_xtalgen(preset: str, num_atoms: torch.Tensor, args: argparse.Namespace) -> dict:
    histogram = {int(n): int((num_atoms == n).sum()) for n in num_atoms.unique()}
    stats = {"mean_density": MEAN_DENSITY, "num_atoms_histogram": histogram}
    model = build_model(ModelConfig(score_net=ScoreNetConfig(preset=preset)), stats).eval()
    count = num_atoms.numel()
    time_steps(model, num_atoms, 1, args.seed)  # warm-up, untimed
    wall, cpu = time_steps(model, num_atoms, args.probe_steps, args.seed)
    per_step, cpu_per_step = wall / args.probe_steps, cpu / args.probe_steps
    entries = {
        str(steps): {
            "seconds_per_structure": per_step * steps / count,
            "cpu_seconds_per_structure": cpu_per_step * steps / count,
        }
        for steps in args.steps
    }
    print(f"[xtalgen {preset}] {per_step:.2f} s/step wall, {cpu_per_step:.2f} s/step cpu", file=sys.stderr)
    return {
        "params": count_parameters(model.score_net),
        "seconds_per_step": per_step,
        "cpu_seconds_per_step": cpu_per_step,
        "measured_steps": args.probe_steps,
        "edges_per_evaluation": edges_per_evaluation(model, num_atoms, args.seed),
        "by_steps": entries,
    }


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
    parser.add_argument("--probe-steps", type=int, default=5, help="steps timed to set the per-step cost")
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
        "what": "seconds per generated structure = per-step cost x steps; a step is predictor + 1 corrector "
        "step (2 network evaluations), measured on prior-sized graphs, random weights",
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
