"""Periodic radius graph on the states a trained model's sampler passes through: this version vs another.

    python benchmarks/graph_states.py MODEL --baseline OLD_GRAPH.py [--batch 16 --steps 50]

Records every state (coordinates, lattice) that `sample` feeds the network, then times
`radius_graph_pbc` on all of them with this checkout's `xtalgen.models.graph` and with the module
file given as `--baseline` (for example `git show REV:models/graph.py > old.py`), alternating state
by state so that both see the same load, and checks that both return the same edges. Noisy states
include sheared and collapsed cells, which is where enumerating images costs most. Prints one JSON
line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--baseline", required=True, help="another graph.py to compare with")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    import xtalgen.models.graph as graph
    from xtalgen.models.io import load_model
    from xtalgen.models.sampler import sample, sample_num_atoms

    spec = importlib.util.spec_from_file_location("baseline_graph", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)

    model = load_model(args.model)[0].eval()
    states = []
    build = graph.radius_graph_pbc

    def recording(cart, lattice, batch_index, num_atoms, cutoff=7.0, max_neighbors=50, **kw):
        states.append((cart.detach().clone(), lattice.detach().clone(), batch_index, num_atoms, cutoff, max_neighbors))
        return build(cart, lattice, batch_index, num_atoms, cutoff, max_neighbors, **kw)

    score_net_module = sys.modules[type(model.score_net).__module__]
    score_net_module.radius_graph_pbc = recording
    generator = torch.Generator().manual_seed(0)
    sample(model, sample_num_atoms(model.stats, args.batch, generator), num_steps=args.steps, generator=generator)
    score_net_module.radius_graph_pbc = build

    # The two versions alternate state by state, so a change of machine load hits both alike.
    seconds, graphs = {"this": 0.0, "baseline": 0.0}, {"this": [], "baseline": []}
    for state in states:
        for name, module in (("this", graph), ("baseline", baseline)):
            start = time.perf_counter()
            graphs[name].append(module.radius_graph_pbc(*state))
            seconds[name] += time.perf_counter() - start
    same = sum(torch.equal(a.edge_index, b.edge_index) and torch.equal(a.cell_offsets, b.cell_offsets)
               for a, b in zip(graphs["this"], graphs["baseline"]))
    print(json.dumps({
        "benchmark": "graph_states", "model": args.model, "states": len(states), "batch": args.batch,
        "seconds_this": round(seconds["this"], 2), "seconds_baseline": round(seconds["baseline"], 2),
        "speedup": round(seconds["baseline"] / seconds["this"], 2), "identical_graphs": same,
        "edges_this": sum(g.edge_index.shape[1] for g in graphs["this"]),
        "edges_baseline": sum(g.edge_index.shape[1] for g in graphs["baseline"]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
