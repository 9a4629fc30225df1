"""Benchmark `build_shards` on simulated Alex-MP-20-style data; prints one JSON line.

    python benchmarks/shard_build.py                      # quick smoke run (2,000 structures)
    python benchmarks/shard_build.py --n 20000 --workers 2 --format lmdb
    python benchmarks/shard_build.py --n 607683 --workers 2 --format webdataset   # full size

The input is written by `benchmarks/simulate.py` (real Perov-5 / Carbon-24 / MP-20 rows,
perturbed; label "simulated") and cached in --work-dir; its generation is not timed. Reported:
wall seconds of the build (read + parse/validate + shard assembly), records/s, the linear
extrapolation to Alex-MP-20's 607,683 structures, and the peak RSS of the main process and of
the largest worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ALEX_MP_20 = 607683


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="structures (Alex-MP-20: 607683)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--format", default="lmdb", choices=["lmdb", "webdataset"])
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/xtalgen-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the shards after the run")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args()

    from simulate import simulate

    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import DataConfig

    data = args.work_dir / f"simulated_{args.n}.csv"
    if not data.exists():
        simulate(args.n, data)
    out = args.work_dir / f"shards_{args.n}_{args.format}_{args.workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = DataConfig()
    cfg.shard.chunk_size = args.chunk_size
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    summary = build_shards([str(data)], out, cfg, fmt=args.format, workers=args.workers, progress=args.progress)
    seconds = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({
        "benchmark": "shard_build",
        "data": "simulated (Perov-5/Carbon-24/MP-20 rows, perturbed; MP-20 CSV layout)",
        "n": args.n,
        "workers": args.workers,
        "format": args.format,
        "chunk_size": args.chunk_size,
        "seconds": round(seconds, 2),
        "records_per_s": round(args.n / seconds, 1),
        "extrapolated_seconds_607683": round(seconds * ALEX_MP_20 / args.n, 1),
        "accepted": summary.accepted,
        "rejected": summary.rejected,
        "shard_mb": round(shard_bytes / 2**20, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu_start, 2),  # main + workers: what a free machine needs
        "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "cpus": os.cpu_count(),
    }))


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


if __name__ == "__main__":
    main()
