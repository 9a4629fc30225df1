"""`xtalgen quickstart`: the whole pipeline, small, on the embedded data, on a CPU, in minutes.

Runs the same commands a user runs, in order — so it is also the shortest tour of xtalgen:

  1. xtalgen shard build builtin:aflow --out OUT/shards      (AFLOW prototypes bundled in pymatgen)
  2. xtalgen shard stats OUT/shards
  3. xtalgen train debug data.shards=OUT/shards ...          (DeepSpeed, debug preset)
  4. xtalgen train consolidate OUT/run --out OUT/model.pt   (EMA weights, one file)
  5. xtalgen sample OUT/model.pt --out OUT/samples
  6. xtalgen evaluate OUT/samples --reference OUT/shards --out OUT/eval   (CHGNet, SUN)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EPILOG = """examples:
  xtalgen quickstart                         # everything under ./quickstart
  xtalgen quickstart --out /tmp/qs --steps 100 --samples 8
  xtalgen quickstart --no-relax              # skip the CHGNet relaxation (fastest)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="run the whole pipeline on the embedded data (shards -> train -> sample -> evaluate)",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("quickstart"), help="output folder (default ./quickstart)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--samples", type=int, default=16, help="structures to sample (default 16)")
    parser.add_argument("--sample-steps", type=int, default=50, help="diffusion steps when sampling (default 50)")
    parser.add_argument("--no-relax", action="store_true", help="evaluate without CHGNet relaxation/stability")
    parser.set_defaults(func=run)


def _step(title: str, argv: list[str]) -> None:
    from xtalgen.cli import main

    print(f"\n==> {title}\n    xtalgen {' '.join(argv)}", flush=True)
    code = main(argv)
    if code != 0:
        raise SystemExit(f"quickstart: `xtalgen {' '.join(argv)}` failed with exit code {code}")


def run(args: argparse.Namespace) -> int:
    import torch

    # The debug network is small: one intra-op thread per process is as fast and leaves the second
    # core to the evaluation workers (measured: 2 threads on a busy 2-core machine were 10x slower).
    torch.set_num_threads(1)
    out: Path = args.out
    shards, run_dir, model, samples, evaluation = (
        out / "shards", out / "run", out / "model.pt", out / "samples", out / "eval"
    )
    start = time.perf_counter()
    if not (shards / "manifest.json").exists():
        _step("1/6 build shards from the embedded AFLOW prototypes",
              ["shard", "build", "builtin:aflow", "--out", str(shards), "--format", "lmdb", "--workers", "2"])
    _step("2/6 shard statistics", ["shard", "stats", str(shards)])
    _step("3/6 train the debug preset with DeepSpeed",
          ["train", "debug", f"data.shards={shards}", f"train.run_dir={run_dir}",
           f"train.max_steps={args.steps}", "train.resume=auto"])
    _step("4/6 consolidate the EMA weights into one model file",
          ["train", "consolidate", str(run_dir), "--out", str(model)])
    _step("5/6 sample new crystals",
          ["sample", str(model), "--out", str(samples), "--num-samples", str(args.samples),
           "--batch-size", str(args.samples), "--steps", str(args.sample_steps), "--seed", "0"])
    evaluate = ["evaluate", str(samples), "--reference", str(shards), "--out", str(evaluation)]
    _step("6/6 evaluate: validity, stability (CHGNet), uniqueness, novelty, SUN",
          evaluate + (["--no-relax"] if args.no_relax else []))
    _print_summary(out, run_dir, model, samples, evaluation, time.perf_counter() - start)
    return 0


def _print_summary(out: Path, run_dir: Path, model: Path, samples: Path, evaluation: Path, seconds: float) -> None:
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    summary = json.loads((evaluation / "summary.json").read_text())
    rates = {k: summary.get(k) for k in ("valid_rate", "unique_rate", "novel_rate", "stable_rate", "sun_rate")}
    print(f"\n==> quickstart finished in {seconds:.0f} s")
    if losses:
        # Single-step losses are noisy (random t per structure): compare the means of the first and
        # last few logged steps.
        k = max(1, len(losses) // 5)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"    training loss  {first:.3f} (first {k} logged steps) -> {last:.3f} (last {k})")
    for name, value in rates.items():
        shown = "not computed" if value is None else f"{100 * value:.1f}%"
        print(f"    {name:<14} {shown}")
    print(f"    run dir        {run_dir}  (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"    model          {model}")
    print(f"    samples        {samples}  (cifs/, samples.extxyz, samples.jsonl)")
    print(f"    evaluation     {evaluation}  (per_structure.csv, summary.json, *.png)")
    print(f"    everything     {out}")
