"""Periodic radius graph: the sphere search vs the cell list, on batches of real and noisy crystals.

    python benchmarks/cell_list_graph.py [--data ../shared/data --batch 64 --repeats 5 --device cpu]

Builds `radius_graph_pbc` (cutoff 7 Å, at most 50 neighbours, as the score network does) with
`algorithm="sphere"` and `algorithm="cell_list"` on the first `--batch` structures of the Perov-5
and Carbon-24 validation splits, at their raw lattices and at noisy ones (Gaussian noise on the
fractional coordinates, sigma 0.05, and a relative strain of the lattice, sigma 0.15, as mid-way
sampler states see), plus a collapsed copy (lattice x 0.4) where the neighbour cap binds. The two
algorithms alternate repeat by repeat, so a change of machine load hits both alike; the median
wall time of `--repeats` runs is reported per case (after one warm-up each), with a check that both
return identical edges and offsets. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd
    import torch
    from pymatgen.core import Structure

    from xtalgen.models.graph import radius_graph_pbc

    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def load(name):
        frame = pd.read_csv(os.path.join(args.data, name, "val.csv"), nrows=args.batch)
        structures = [Structure.from_str(cif, fmt="cif") for cif in frame["cif"]]
        num_atoms = torch.tensor([len(s) for s in structures])
        frac = torch.from_numpy(np.concatenate([s.frac_coords for s in structures]) % 1.0)
        lattice = torch.from_numpy(np.stack([s.lattice.matrix for s in structures]))
        return frac, lattice, num_atoms

    generator = torch.Generator().manual_seed(0)
    cases = {}
    for name, short in (("perov_5", "perov"), ("carbon_24", "carbon")):
        frac, lattice, num_atoms = load(name)
        noisy_frac = (frac + 0.05 * torch.randn(frac.shape, generator=generator, dtype=frac.dtype)) % 1.0
        strain = 0.15 * torch.randn(lattice.shape, generator=generator, dtype=lattice.dtype)
        noisy_lattice = lattice @ (torch.eye(3, dtype=lattice.dtype) + strain)
        cases[f"{short}_raw"] = (frac, lattice, num_atoms)
        cases[f"{short}_noisy"] = (noisy_frac, noisy_lattice, num_atoms)
        cases[f"{short}_collapsed"] = (noisy_frac, noisy_lattice * 0.4, num_atoms)

    results = {}
    for case, (frac, lattice, num_atoms) in cases.items():
        batch_index = torch.repeat_interleave(torch.arange(num_atoms.numel()), num_atoms).to(device)
        lattice, num_atoms = lattice.to(device), num_atoms.to(device)
        cart = torch.einsum("ni,nij->nj", frac.to(device), lattice[batch_index])
        times = {"sphere": [], "cell_list": []}
        graphs = {}
        for repeat in range(args.repeats + 1):
            order = ("sphere", "cell_list") if repeat % 2 == 0 else ("cell_list", "sphere")
            for algorithm in order:
                sync()
                start = time.perf_counter()
                graphs[algorithm] = radius_graph_pbc(cart, lattice, batch_index, num_atoms, 7.0, 50,
                                                     algorithm=algorithm)
                sync()
                if repeat:  # the first is a warm-up
                    times[algorithm].append(time.perf_counter() - start)
        sphere_ms = 1e3 * statistics.median(times["sphere"])
        cell_ms = 1e3 * statistics.median(times["cell_list"])
        a, b = graphs["sphere"], graphs["cell_list"]
        results[case] = {
            "atoms": int(num_atoms.sum()),
            "edges": int(a.edge_index.shape[1]),
            "ms_sphere": round(sphere_ms, 1),
            "ms_cell_list": round(cell_ms, 1),
            "speedup_cell_list": round(sphere_ms / cell_ms, 2),
            "identical": bool(torch.equal(a.edge_index, b.edge_index) and torch.equal(a.cell_offsets, b.cell_offsets)),
        }

    print(json.dumps({
        "benchmark": "cell_list_graph",
        "batch": args.batch,
        "repeats": args.repeats,
        "cutoff": 7.0,
        "max_neighbors": 50,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cases": results,
        "all_identical": all(r["identical"] for r in results.values()),
        "versions": {"torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "date": datetime.date.today().isoformat(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
