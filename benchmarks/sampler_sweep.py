"""Sampler settings against sample quality, one trained model: which few-step sampler to default to.

    python benchmarks/sampler_sweep.py build/quality/perov_5/model.pt --dataset perov_5 \\
        --reference build/quality/perov_5/shards --count 300 \\
        --variant 'pc50=50' --variant 'p50=50:corrector_steps=0' --variant 'p50_pow2=50:corrector_steps=0,time_power=2'

Each `--variant LABEL=STEPS[:KEY=VALUE,...]` is sampled with `xtalgen sample` (same seed, same
numbers of atoms) and scored with `xtalgen evaluate --no-relax` against the dataset's test.csv with
the CDVAE metrics. Prints one JSON line per variant (COV-R/COV-P, validity, Wasserstein distances,
physical-cell rate, structures per second of sampling) and writes WORK/sweep.jsonl. Finished
variants are kept when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED_DATA, _setting_row, _xtalgen  # noqa: E402  (a sibling script)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--dataset", required=True, choices=("perov_5", "carbon_24"))
    parser.add_argument("--reference", required=True, help="the training shards (novelty)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variant", action="append", required=True, metavar="LABEL=STEPS[:K=V,...]")
    parser.add_argument("--work", type=Path, help="default: MODEL's folder/sweep")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.work or Path(args.model).resolve().parent / "sweep"
    work.mkdir(parents=True, exist_ok=True)
    test = args.data / args.dataset / "test.csv"
    with (work / "sweep.jsonl").open("a") as log:
        for spec in args.variant:
            label, _, rest = spec.partition("=")
            steps, _, overrides = rest.partition(":")
            samples, evaluation = work / f"samples_{label}", work / f"eval_{label}"
            started = time.perf_counter()
            _xtalgen("sample", args.model, "--out", str(samples), "--num-samples", str(args.count),
                     "--batch-size", str(args.batch_size), "--steps", steps, "--seed", "0", "--no-progress",
                     *[kv for kv in overrides.split(",") if kv])
            seconds = round(time.perf_counter() - started, 1)  # a resumed set: the rest only
            _xtalgen("evaluate", str(samples), "--reference", args.reference, "--test-split", str(test),
                     "--dataset", args.dataset, "--out", str(evaluation), "--no-relax",
                     *(("--no-matching",) if args.dataset == "carbon_24" else ()))  # see quality.py
            summary = json.loads((evaluation / "summary.json").read_text())
            row = {"benchmark": "sampler_sweep", "model": args.model, "variant": label, "overrides": overrides,
                   **_setting_row(int(steps), args.count, summary, seconds),
                   "structures_per_s": round(args.count / max(seconds, 1e-9), 2)}
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()  # a row per finished variant, even if a later one is interrupted
    return 0


if __name__ == "__main__":
    sys.exit(main())
