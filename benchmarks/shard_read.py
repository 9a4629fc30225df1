"""Shard read throughput and loader memory: structures/s through CrystalLoader into CrystalBatch.

    python benchmarks/shard_read.py --format lmdb --n 60000,607683
    python benchmarks/shard_read.py --format webdataset --n 20000 --workers 2

Data: simulated. Real Perov-5 and Carbon-24 rows (../shared/data) are perturbed (lattice strain,
coordinate jitter, unique ids) to reach N records, written with ShardSetWriter, then read for one
full shuffled epoch in a fresh process, so its peak memory is the loader's alone. Peak RSS counts
the LMDB file's memory-mapped pages (page cache, shared and reclaimable); peak anonymous RSS is
the process's own memory, which must not grow with N.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def real_records(limit: int):
    import pandas as pd
    from pymatgen.io.cif import CifParser

    from xtalgen.record import CrystalRecord

    out = []
    for csv in (SHARED / "perov_5" / "val.csv", SHARED / "carbon_24" / "val.csv"):
        for row in pd.read_csv(csv, nrows=limit).itertuples():
            structure = CifParser.from_str(row.cif).parse_structures(primitive=False)[0]
            props = {"energy": float(getattr(row, "heat_all", getattr(row, "energy_per_atom", 0.0)))}
            out.append(CrystalRecord.from_structure(structure, id=str(row.material_id), properties=props))
    return out


def build(out: Path, fmt: str, n: int, records_per_shard: int, seed: int = 0) -> float:
    """Write n simulated records; returns seconds spent."""
    from xtalgen.record import CrystalRecord
    from xtalgen.sharding import ShardSetWriter

    base = real_records(250)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    writer = ShardSetWriter(out, fmt=fmt, records_per_shard=records_per_shard)
    for i in range(n):
        r = base[i % len(base)]
        strain = np.eye(3) + rng.normal(0.0, 0.01, (3, 3))
        frac = (r.frac_coords + rng.normal(0.0, 0.005, r.frac_coords.shape)) % 1.0
        writer.add("train", CrystalRecord(id=f"sim-{i}", lattice=r.lattice @ strain, frac_coords=frac,
                                          atomic_numbers=r.atomic_numbers, properties=r.properties))
    writer.finalize(sources=[{"path": "simulated from perov_5/val.csv + carbon_24/val.csv", "sha256": None,
                              "bytes": None}])
    return time.perf_counter() - start


def read(shard_dir: Path, batch_size: int, workers: int, max_atoms: int) -> dict:
    """One shuffled epoch through CrystalLoader (runs in its own process, see main)."""
    from xtalgen.datasets.loader import CrystalLoader

    def rss_anon_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    loader = CrystalLoader(shard_dir, batch_size=batch_size, max_atoms_per_batch=max_atoms, num_workers=workers,
                           shuffle=True, seed=0)
    structures = atoms = batches = 0
    peak_anon = rss_anon_kib()
    start = time.perf_counter()
    for batch in loader:
        structures += batch.num_structures
        atoms += batch.num_atoms_total
        batches += 1
        if batches % 64 == 0:
            peak_anon = max(peak_anon, rss_anon_kib())
    seconds = time.perf_counter() - start
    return {
        "structures": structures, "atoms": atoms, "batches": batches, "seconds": round(seconds, 3),
        "structures_per_s": round(structures / seconds, 1), "atoms_per_s": round(atoms / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_anon_mib": round(max(peak_anon, rss_anon_kib()) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("lmdb", "webdataset"), default="lmdb")
    parser.add_argument("--n", default="20000", help="record count(s), comma separated (e.g. 60000,607683)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-atoms", type=int, default=0, help="atom budget per batch (0 = none)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--records-per-shard", type=int, default=20000)
    parser.add_argument("--work-dir", type=Path, help="keep shards here (reused when present)")
    parser.add_argument("--read-only", type=Path, help=argparse.SUPPRESS)  # internal: the measuring process
    args = parser.parse_args()
    if args.read_only:
        print(json.dumps(read(args.read_only, args.batch_size, args.workers, args.max_atoms)))
        return

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="xtalgen-shard-read-"))
    runs = []
    for n in (int(x) for x in args.n.split(",")):
        shard_dir = work / f"{args.format}-{n}"
        build_s = None
        if not (shard_dir / "manifest.json").exists():
            build_s = round(build(shard_dir, args.format, n, args.records_per_shard), 2)
        child = subprocess.run(
            [sys.executable, __file__, "--read-only", str(shard_dir), "--batch-size", str(args.batch_size),
             "--workers", str(args.workers), "--max-atoms", str(args.max_atoms)],
            check=True, capture_output=True, text=True)
        runs.append({"n": n, "build_s": build_s, **json.loads(child.stdout.strip().splitlines()[-1])})
    print(json.dumps({
        "benchmark": "shard_read", "format": args.format, "data": "simulated (perturbed Perov-5 + Carbon-24 rows)",
        "batch_size": args.batch_size, "max_atoms_per_batch": args.max_atoms, "workers": args.workers,
        "runs": runs, "structures_per_s": min(r["structures_per_s"] for r in runs),
    }))


if __name__ == "__main__":
    main()
