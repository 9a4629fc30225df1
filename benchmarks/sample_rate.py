"""Sampling rate of a trained model: structures per second of the real sampler, by batch size.

    python benchmarks/sample_rate.py build/quality/perov_5/model.pt --steps 50 --batch-sizes 64,256
    python benchmarks/sample_rate.py MODEL --corrector-steps 0      # predictor only (1 evaluation a step)
    python benchmarks/sample_rate.py MODEL --compile                # sample.compile: inductor-compiled layers

Runs `xtalgen.models.sampler.sample` end to end (numbers of atoms from the model's histogram, seed
0), so the cost includes the radius graph of every state the trained model passes through. Also
reports how much of the time the periodic graph took and the volume per atom of the results.
Prints one JSON line per batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model file (xtalgen train consolidate)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--corrector-steps", type=int, default=1)
    parser.add_argument("--batch-sizes", default="16,64,256")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true",
                        help="compile the layers first (sample.compile); the compilation is timed apart")
    args = parser.parse_args()

    import xtalgen.models.graph as graph
    from xtalgen.models.io import load_model
    from xtalgen.models.sampler import sample, sample_num_atoms
    from xtalgen.models.score_net import compile_layers

    torch.set_num_threads(args.threads)
    model = load_model(args.model)[0].eval()
    compile_seconds = None
    if args.compile:
        compile_layers(model.score_net)
        start = time.perf_counter()  # the first call compiles: one short run, timed on its own
        sample(model, sample_num_atoms(model.stats, 8, torch.Generator().manual_seed(1)), num_steps=2)
        compile_seconds = round(time.perf_counter() - start, 1)
    graph_seconds = [0.0]
    select_edges = graph._select_edges

    def timed_select_edges(*a, **k):
        start = time.perf_counter()
        try:
            return select_edges(*a, **k)
        finally:
            graph_seconds[0] += time.perf_counter() - start

    graph._select_edges = timed_select_edges
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        generator = torch.Generator().manual_seed(0)
        num_atoms = sample_num_atoms(model.stats, batch, generator)
        graph_seconds[0] = 0.0
        start, cpu_start = time.perf_counter(), time.process_time()
        out = sample(model, num_atoms, num_steps=args.steps, corrector_steps=args.corrector_steps, generator=generator)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        volume = (torch.det(out.lattice).abs() / out.num_atoms).sort().values
        print(json.dumps({
            "benchmark": "sample_rate", "model": args.model, "steps": args.steps,
            "corrector_steps": args.corrector_steps, "threads": args.threads, "batch_size": batch,
            "compiled": args.compile, "compile_seconds": compile_seconds,
            "atoms": int(num_atoms.sum()), "seconds": round(seconds, 2),
            "structures_per_s": round(batch / seconds, 3), "cpu_seconds": round(cpu_seconds, 2),
            "structures_per_cpu_s": round(batch / cpu_seconds, 3), "graph_fraction": round(graph_seconds[0] / seconds, 3),
            "volume_per_atom_median": round(float(volume[len(volume) // 2]), 2),
            "volume_per_atom_in_5_60": round(float(((volume > 5) & (volume < 60)).float().mean()), 3),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
