"""`xtalgen train CONFIG [k=v ...] [--debug]` and `xtalgen train consolidate RUN_DIR --out model.pt`.

The same command runs in one process or under `torchrun`, the `deepspeed` launcher or `srun`;
rank and world size come from the launcher's environment.
"""

from __future__ import annotations

import argparse
import logging
import sys

EPILOG = """examples:
  xtalgen train debug data.shards=shards/perov train.max_steps=300
  xtalgen train configs/base.yaml data.shards=shards/mp20 train.zero_stage=2 --debug
  torchrun --nproc_per_node 8 $(which xtalgen) train base data.shards=shards/alex train.run_dir=runs/base
  xtalgen train base data.shards=shards/alex train.run_dir=runs/base train.resume=auto   # continue
  xtalgen train consolidate runs/base --out base.pt          # EMA weights -> one model file
  xtalgen train base data.shards=shards/alex --check         # validate config and inputs only

exit codes: 0 done, 2 config error or a damaged shard (one line names the shard and key),
3 stopped on non-finite losses, 75 preempted (checkpoint written on SIGTERM/SIGUSR1; run again
with train.resume=auto)
"""

DEBUG_OVERRIDES = [
    "model.score_net.preset=debug",
    "train.log_every=1",
    "train.debug=true",
]
DEBUG_MAX_STEPS = 20


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model with DeepSpeed (or `train consolidate` a checkpoint)",
        description="Train a crystal diffusion model. CONFIG is a preset name (debug, base, large, xl) "
                    "or a YAML file; key=value pairs override it.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="preset name or YAML path, or `consolidate`")
    parser.add_argument("rest", nargs="*", metavar="k=v", help="config overrides (dotted keys)")
    parser.add_argument("--debug", action="store_true",
                        help=f"tiny preset, at most {DEBUG_MAX_STEPS} steps, anomaly detection, per-step output")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config, the shards and train.resume, then exit (0 if good, 2 if not)")
    parser.add_argument("--out", help="consolidate: output model file")
    parser.add_argument("--raw", action="store_true", help="consolidate: raw weights instead of the EMA")
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.config == "consolidate":
        return _consolidate(args)
    from xtalgen.dirlock import OutputInUseError
    from xtalgen.schema import load_config
    from xtalgen.sharding.codec import ShardCorruptionError
    from xtalgen.train.build import build_trainer
    from xtalgen.train.distributed import StoppedByPeer, shutdown_distributed_at_exit
    from xtalgen.train.trainer import EXIT_CORRUPT_DATA, EXIT_RUN_DIR_IN_USE, run_and_report

    overrides = list(args.rest)
    if args.debug:
        cfg = load_config([args.config], overrides)
        steps = min(cfg.train.max_steps, DEBUG_MAX_STEPS)
        overrides = overrides + DEBUG_OVERRIDES + [f"train.max_steps={steps}"]
    cfg = load_config([args.config], overrides)
    if args.check:
        return _check(cfg)
    try:
        code = run_and_report(build_trainer(cfg))
    except ShardCorruptionError as exc:
        # Raised on one rank only (`stop_together`), so this line is printed once per run.
        print(f"xtalgen: error: {exc}{_damage_hint(exc, cfg.data.shards)}", file=sys.stderr, flush=True)
        code = EXIT_CORRUPT_DATA
    except OutputInUseError as exc:  # raised on rank 0 only (`stop_together`)
        print(f"xtalgen: error: {exc}", file=sys.stderr, flush=True)
        code = EXIT_RUN_DIR_IN_USE
    except StoppedByPeer:  # the rank that met the error says so; this one stops quietly (same exit code)
        code = EXIT_CORRUPT_DATA
    # Every path that gets here left its collectives together (a finished run, or `stop_together`);
    # an unexpected exception skips this on purpose, since its peers may still wait in one.
    shutdown_distributed_at_exit()
    return code


def _damage_hint(exc, shards: str) -> str:
    """What to run next. A shard that could not be fetched (404, failing pipe: command) is not
    damage, and `shard verify` reads a local directory: a remote set is verified where it was built."""
    from xtalgen.sharding import ShardUnavailableError, is_remote

    if isinstance(exc, ShardUnavailableError):
        return ""
    where = "the shard directory it was copied from" if is_remote(shards) else shards
    return f"; `xtalgen shard verify {where}` lists every damaged shard"


def _check(cfg) -> int:
    """`--check`: what a run would refuse at start-up, without starting one (no DeepSpeed, no ranks)."""
    from xtalgen.train.build import check_inputs

    check_inputs(cfg)  # raises ConfigError: one line, exit code 2 (xtalgen.cli)
    resume = cfg.train.resume if cfg.train.resume not in ("", "none") else "no"
    print(f"ok: config, shards {cfg.data.shards}, run dir {cfg.train.run_dir} (resume: {resume})")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    if len(args.rest) != 1 or not args.out:
        print("usage: xtalgen train consolidate RUN_DIR_OR_CHECKPOINT --out model.pt [--raw]", file=sys.stderr)
        return 2
    from xtalgen.train.consolidate import consolidate

    path = consolidate(args.rest[0], args.out, use_ema=not args.raw)
    print(f"wrote {path} ({'raw' if args.raw else 'EMA'} weights from {args.rest[0]})")
    return 0
