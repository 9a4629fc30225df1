"""Training throughput: structures/s and atoms/s (total and per device) and peak memory of `xtalgen train`.

Builds LMDB shards from a real data file (default: the first 512 rows of Perov-5's val.csv in
../shared/data; shards are cached under the system temp dir), then runs the real training command
(`xtalgen train`, under `torch.distributed.run` for --ranks > 1) for `--warmup + --steps` optimizer
steps with per-step logging, and reports rates over the steps after the warm-up from the run's
metrics.jsonl. Peak memory is rank 0's (CUDA max allocated on GPU, max RSS on CPU).

Prints one JSON line.

Example:
  python benchmarks/train_throughput.py --preset debug --ranks 2 --steps 10
  python benchmarks/train_throughput.py --preset base --ranks 1 --micro 8 --steps 5 --zero 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "perov_5" / "val.csv"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def build_shards_once(csv: Path, rows: int) -> Path:
    """LMDB shards of the first `rows` rows, cached by the source's content and the row count."""
    import pandas as pd

    from xtalgen.datasets.build import build_shards
    from xtalgen.schema import DataConfig

    digest = hashlib.sha256(csv.read_bytes()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"xtalgen_bench_shards_{digest}_{rows}"
    if (root / "shards" / "manifest.json").exists():
        return root / "shards"
    root.mkdir(parents=True, exist_ok=True)
    subset = root / csv.name
    pd.read_csv(csv, nrows=rows).to_csv(subset, index=False)
    data = DataConfig()
    data.shard.split = "train"  # every structure feeds training
    build_shards([str(subset)], root / "shards", data, fmt="lmdb", workers=1, progress=False)
    return root / "shards"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_training(args: argparse.Namespace, shards: Path, run_dir: Path) -> None:
    overrides = [
        f"data.shards={shards}", f"train.run_dir={run_dir}", f"model.score_net.preset={args.preset}",
        f"train.max_steps={args.warmup + args.steps}", "train.log_every=1",
        f"train.checkpoint_every={10**9}", f"train.zero_stage={args.zero}", f"train.precision={args.precision}",
        f"train.micro_batch_structures={args.micro}", f"train.global_batch_structures={args.micro * args.ranks}",
        "train.wandb.enabled=false", "train.sample_every=0", "train.optim.scheduler=constant",
    ]
    entry = ["-m", "xtalgen.cli", "train", "debug", *overrides]
    if args.ranks == 1:
        command = [sys.executable, *entry]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                   f"--nproc_per_node={args.ranks}", f"--master_port={free_port()}", *entry]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["WANDB_MODE"] = "disabled"
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"training failed with exit code {result.returncode}")


def summarise(args: argparse.Namespace, run_dir: Path, csv: Path, rows: int) -> dict:
    from xtalgen.models.score_net import build_score_net, count_parameters
    from xtalgen.schema.model import ScoreNetConfig

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in lines if m["step"] > args.warmup]
    # Each record covers one step: time = structures / rate. Aggregate as totals over totals.
    structures_per_step = args.micro * args.ranks
    seconds = sum(structures_per_step / m["structures_per_s"] for m in timed)
    atoms = sum(m["atoms_per_s"] * structures_per_step / m["structures_per_s"] for m in timed)
    summary = json.loads((run_dir / "summary.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    return {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "parameters": count_parameters(build_score_net(ScoreNetConfig(preset=args.preset))),
        "ranks": args.ranks,
        "device": info.get("device", "cuda" if _cuda() else "cpu"),
        "zero_stage": args.zero,
        "precision": args.precision,
        "micro_batch_structures": args.micro,
        "timed_steps": len(timed),
        "warmup_steps": args.warmup,
        "structures_per_s": structures_per_step * len(timed) / seconds,
        "atoms_per_s": atoms / seconds,
        "structures_per_s_per_device": structures_per_step * len(timed) / seconds / args.ranks,
        "atoms_per_s_per_device": atoms / seconds / args.ranks,
        "seconds_per_step": seconds / len(timed),
        "peak_memory_mb_rank0": summary["peak_memory_mb"],
        "data": f"{csv.name} (first {rows} rows, {csv.parent.name})",
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example: python benchmarks/train_throughput.py --preset debug --ranks 2")
    parser.add_argument("--preset", default="debug", choices=["debug", "base", "large", "xl"])
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--micro", type=int, default=16, help="structures per micro batch per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSV with a cif column")
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"data file not found: {args.data}")
    shards = build_shards_once(args.data, args.rows)
    with tempfile.TemporaryDirectory(prefix="xtalgen_bench_run_") as tmp:
        run_dir = Path(tmp) / "run"
        run_training(args, shards, run_dir)
        print(json.dumps(summarise(args, run_dir, args.data, args.rows), sort_keys=True))


if __name__ == "__main__":
    main()
