"""`xtalgen train CONFIG [k=v ...] [--debug]`, `xtalgen train consolidate RUN_DIR --out model.pt` and
`xtalgen finetune BASE RECIPE [k=v ...]`.

`train` has two subcommands: `run` (the default: `xtalgen train CONFIG ...` is `xtalgen train run
CONFIG ...`, so CONFIG can never be the word `consolidate`) and `consolidate`.

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

FINETUNE_EPILOG = """examples:
  xtalgen finetune base.pt dft_band_gap data.shards=shards/alex train.run_dir=runs/gap
  xtalgen finetune runs/base dft_mag_density data.shards=shards/alex finetune.max_labels=5000
  xtalgen finetune base.pt dft_mag_density+hhi_score data.shards=shards/alex finetune.full=true
  torchrun --nproc_per_node 8 $(which xtalgen) finetune base.pt chemical_system data.shards=shards/alex
  xtalgen finetune base.pt my_recipe.yaml data.shards=shards/mine --check   # validate only
  xtalgen train consolidate runs/gap --out gap.pt
  xtalgen sample gap.pt --out gap3 --condition dft_band_gap=3.0 --guidance 2
  xtalgen sample gap.pt --out wide --condition 'dft_band_gap>=3' --guidance 2

BASE is an unconditional model file or a training run directory (its latest EMA weights, written
to RUN_DIR/base.pt). RECIPE is a name under configs/finetune/ (dft_band_gap, chemical_system, ...;
`a+b` for the multi-property ones) or a YAML file; a property of your own needs only a YAML file
naming it in model.conditions. The network is the base's; the recipe adds the conditions, and
by default trains only the adapters and property embeddings (finetune.full=true trains all).
The data are the records carrying every conditioned property (finetune.max_labels=N keeps N of
them), read from data.shards through a subset index (`xtalgen shard subset`).

exit codes: as `xtalgen train`.
"""

DEBUG_OVERRIDES = [
    "model.score_net.preset=debug",
    "train.log_every=1",
    "train.debug=true",
]
DEBUG_MAX_STEPS = 20


CONSOLIDATE_EPILOG = """examples:
  xtalgen train consolidate runs/base --out base.pt                  # the latest checkpoint's EMA weights
  xtalgen train consolidate runs/base/checkpoints/step_00010000 --out base10k.pt
  xtalgen train consolidate runs/base --out raw.pt --raw             # the training weights instead

Runs in one process without DeepSpeed's ranks, whatever the ZeRO stage and number of ranks that
wrote the checkpoint. The model file loads with `xtalgen sample model.pt` or
`xtalgen.models.io.load_model`.
"""


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "train", help="train a model with DeepSpeed (or `train consolidate` a checkpoint)",
        description="Train a crystal diffusion model, or consolidate a run's checkpoint into a model file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.default_subcommand = "run"  # `xtalgen train CONFIG ...`
    commands = train.add_subparsers(dest="train_command", metavar="{CONFIG,consolidate}")
    parser = commands.add_parser(
        "run", prog=train.prog,  # reached without the word `run`; its usage and help are `train`'s
        description="Train a crystal diffusion model. CONFIG is a preset name (debug, base, large, xl) "
                    "or a YAML file; key=value pairs override it. `xtalgen train consolidate RUN_DIR "
                    "--out model.pt` turns a run into a model file (see `xtalgen train consolidate --help`).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="preset name or YAML path")
    parser.add_argument("rest", nargs="*", metavar="k=v", help="config overrides (dotted keys)")
    parser.add_argument("--debug", action="store_true",
                        help=f"tiny preset, at most {DEBUG_MAX_STEPS} steps, anomaly detection, per-step output")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config, the shards and train.resume, then exit (0 if good, 2 if not)")
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=main)

    consolidate = commands.add_parser(
        "consolidate", help="write a run's (EMA) weights into one model file",
        description="Consolidate a training checkpoint (any ZeRO stage, any number of ranks) into one "
                    "weights-only model file.",
        epilog=CONSOLIDATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    consolidate.add_argument("source", metavar="RUN_DIR",
                             help="run directory, its checkpoints/ directory, the `latest` file, or one checkpoint")
    consolidate.add_argument("--out", required=True, metavar="FILE", help="output model file")
    consolidate.add_argument("--raw", action="store_true", help="the raw training weights instead of the EMA")
    consolidate.set_defaults(func=consolidate_main)

    finetune = subparsers.add_parser(
        "finetune", help="fine-tune a base model on a property subset (adapters, classifier-free guidance)",
        description="Fine-tune a pre-trained model on the structures that carry one or more properties.",
        epilog=FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("base", metavar="BASE", help="unconditional model file or training run directory")
    finetune.add_argument("recipe", metavar="RECIPE", help="recipe name under configs/finetune/, or a YAML file")
    finetune.add_argument("rest", nargs="*", metavar="k=v", help="config overrides (dotted keys)")
    finetune.add_argument("--check", action="store_true",
                          help="only validate the recipe, the base, the shards and train.resume, then exit")
    finetune.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    finetune.set_defaults(func=finetune_main, debug=False)


def finetune_main(args: argparse.Namespace) -> int:
    from xtalgen.schema import load_config, preset_path

    recipe = preset_path(args.recipe, folder="finetune")
    cfg = load_config([recipe], [*args.rest, f"finetune.base={args.base}"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from xtalgen.train.finetune import build_finetune_trainer, check_finetune_inputs

    check_finetune_inputs(cfg)
    if args.check:
        from pathlib import Path

        from xtalgen.train.finetune import read_base

        if Path(args.base).is_file():  # a run directory is consolidated only when the run starts
            read_base(Path(args.base), args.base)
        return _check(cfg)
    return _run(cfg, build_finetune_trainer)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from xtalgen.schema import load_config
    from xtalgen.train.build import build_trainer

    overrides = list(args.rest)
    if args.debug:
        cfg = load_config([args.config], overrides)
        steps = min(cfg.train.max_steps, DEBUG_MAX_STEPS)
        overrides = overrides + DEBUG_OVERRIDES + [f"train.max_steps={steps}"]
    cfg = load_config([args.config], overrides)
    if args.check:
        return _check(cfg)
    return _run(cfg, build_trainer)


def _run(cfg, build) -> int:
    """Build the trainer (`build(cfg)`), train, and turn the ways a run stops into exit codes."""
    from xtalgen.dirlock import OutputInUseError
    from xtalgen.sharding.codec import ShardCorruptionError
    from xtalgen.train.distributed import StoppedByPeer, shutdown_distributed_at_exit
    from xtalgen.train.trainer import EXIT_CORRUPT_DATA, EXIT_RUN_DIR_IN_USE, run_and_report

    try:
        code = run_and_report(build(cfg))
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


def consolidate_main(args: argparse.Namespace) -> int:
    """`xtalgen train consolidate RUN_DIR --out model.pt [--raw]`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from xtalgen.train.consolidate import consolidate

    path = consolidate(args.source, args.out, use_ema=not args.raw)
    print(f"wrote {path} ({'raw' if args.raw else 'EMA'} weights from {args.source})")
    return 0
