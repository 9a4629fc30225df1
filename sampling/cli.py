"""`xtalgen sample`: generate crystals from a trained model into CIFs, one extxyz and a JSONL."""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
from pathlib import Path

EPILOG = """examples:
  xtalgen sample model.pt --out samples --num-samples 1000 --batch-size 64
  xtalgen sample runs/mp20/checkpoints/latest --out samples   # EMA weights of a run's latest checkpoint
  xtalgen sample runs/mp20 --out gap3 --condition dft_band_gap=3.0 --guidance 2.0
  xtalgen sample gap.pt --out wide --condition 'dft_band_gap>=3' --guidance 2.0   # a range target
  xtalgen sample model.pt --out licoo --condition chemical_system=Li-Co-O --num-atoms 12
  xtalgen sample model.pt --out c2m --space-group 12 --templates train.csv   # symmetry of training C2/m crystals
  xtalgen sample model.pt --out fast --steps 50 sample.coord_snr=0.8 sample.time_power=2 sample.corrector_steps=2   # few steps
  xtalgen sample model.pt --out many --num-samples 5000 --batch-size 64 sample.compile=true   # compiled layers
  torchrun --nproc-per-node 4 -m xtalgen.cli sample model.pt --out big --num-samples 100000
  xtalgen sample --merge big                          # union of the rank parts, if a rank was lost
  xtalgen sample model.pt --out big --rank 3 --world-size 8 --no-merge   # one array task; merge later

CHECKPOINT is a model file (`xtalgen train consolidate`), a training run directory, its checkpoints/
directory, the `latest` file in it, or one checkpoint directory: the EMA weights of that checkpoint
(the latest one for a run) are consolidated in memory; nothing is written into the run.

Each rank writes its own part (samples.rank{r}.jsonl/.extxyz) and rank 0 merges them into
samples.jsonl / samples.extxyz, ordered by id. Rerunning the same command continues an interrupted
run: finished batches are kept, nothing is made twice, and the same --seed gives the same structures
whatever the number of ranks.
"""

_SECTIONS = ("data", "model", "train", "sample", "evaluate")
RUN_MODEL_FILE = "model.pt"  # a consolidated model kept in a directory without checkpoints

def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate crystals from a trained model",
        description="Sample crystals with predictor-corrector diffusion and classifier-free guidance.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", nargs="?",
                        help="model file (model.pt), run directory, its checkpoints/ or checkpoints/latest, "
                             "or one checkpoint directory")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. sample.coord_snr=0.3 (the `sample.` prefix is optional)")
    parser.add_argument("--out", help="output directory (created; an existing one is resumed)")
    parser.add_argument("--config", action="append", default=[], help="YAML config or preset name")
    parser.add_argument("--num-samples", type=int, help="structures to make (default 16)")
    parser.add_argument("--batch-size", type=int, help="structures per sampler call (default 16)")
    parser.add_argument("--steps", type=int, help="diffusion steps (default 1000, MatterGen)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 1.0)")
    parser.add_argument("--num-atoms", type=int, help="atoms per structure (default: from the training histogram)")
    parser.add_argument("--condition", action="append", default=[], metavar="NAME=VALUE",
                        help="property to condition on, repeatable: NAME=VALUE, or for a scalar a range "
                             "'NAME>=X', 'NAME<=X', NAME=LOW..HIGH (targets drawn from the fine-tuning data in it)")
    parser.add_argument("--space-group", type=int, metavar="N",
                        help="make every structure with space group N (1-230): each is sampled under the "
                             "symmetry (Wyckoff orbits, lattice system, atom count) of one structure of group N "
                             "from --templates; a model fine-tuned on space_group is also conditioned on N")
    parser.add_argument("--templates", metavar="PATH",
                        help="structures to take --space-group templates from: shard set, CSV with a cif "
                             "column, CIF folder or extxyz (normally the training data)")
    parser.add_argument("--seed", type=int, help="base seed (default 0); batch b draws from seed (seed, b)")
    parser.add_argument("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--rank", type=int, help="this process's rank (default: RANK or SLURM_PROCID)")
    parser.add_argument("--world-size", type=int, help="number of ranks (default: WORLD_SIZE or SLURM_NTASKS)")
    parser.add_argument("--merge-wait", type=float, default=600.0,
                        help="seconds rank 0 waits for the other ranks before merging (default 600)")
    parser.add_argument("--no-merge", action="store_true",
                        help="write this rank's part only; merge later with --merge DIR (Slurm array tasks, "
                             "where rank 0 should not hold its allocation waiting for the others)")
    parser.add_argument("--merge", metavar="DIR", help="only merge the rank parts of DIR and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xtalgen.schema import ConfigError

    if args.merge:
        return _merge_only(Path(args.merge))
    if not args.checkpoint or not args.out:
        raise ConfigError("give a CHECKPOINT and --out DIR (or --merge DIR)")
    cfg = _sample_config(args)

    import torch

    from xtalgen.sampling.driver import sample_to_directory
    from xtalgen.sampling.plan import rank_from_env

    rank, world_size = rank_from_env()
    rank = args.rank if args.rank is not None else rank
    world_size = args.world_size if args.world_size is not None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
    model, model_cfg, stats, checkpoint = load_for_sampling(args.checkpoint)
    _check_same_checkpoint(Path(args.out), checkpoint)
    if rank == 0:  # one warning per job, not one per rank
        _warn_if_guidance_is_unused(args, cfg, model_cfg)
    summary = sample_to_directory(
        model, model_cfg, stats, cfg, args.out,
        checkpoint=str(checkpoint),
        rank=rank, world_size=world_size,
        device=torch.device(args.device) if args.device else None,
        progress=rank == 0 and not args.no_progress,  # one bar, not W interleaved ones
        merge_wait_s=args.merge_wait,
        merge=not args.no_merge,
    )
    print(
        f"rank {rank}/{world_size}: sampled {summary.num_new} structures in {summary.seconds:.1f} s "
        f"({summary.structures_per_second:.2f} structures/s); {summary.num_already_done} were already done"
    )
    if summary.merge is None:
        return 0
    return _report_merge(summary.merge)


def load_for_sampling(source: str):
    """(model, model config, stats, resolved path) from a model file or a training run/checkpoint.

    A model file is loaded weights-only. A directory (or `checkpoints/latest`) is consolidated in
    memory by `xtalgen train consolidate`'s own code path (EMA weights, weights-only reads, no
    DeepSpeed), imported only then: sampling a model file never loads the training stack.
    Any problem is a one-line `ConfigError` naming the path.
    """
    from xtalgen.schema import ConfigError

    path = Path(source)
    if not path.exists():
        raise ConfigError(f"checkpoint {source}: no such file or directory")
    if path.is_dir() or path.name == "latest":
        from xtalgen.train.consolidate import consolidated_model

        try:
            model, model_cfg, stats, extra = consolidated_model(path, use_ema=True)
            return model, model_cfg, stats, Path(extra["checkpoint"]).resolve()
        except FileNotFoundError as exc:
            if not (path / RUN_MODEL_FILE).is_file():
                raise ConfigError(f"checkpoint {source}: {_first_line(exc)}") from None
            path = path / RUN_MODEL_FILE
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
            raise ConfigError(f"checkpoint {source}: {_first_line(exc)}") from None
    from xtalgen.models.io import load_model

    try:
        model, model_cfg, stats = load_model(path, map_location="cpu")
    except ValueError as exc:  # the loader's own check names the file and the format it found
        raise ConfigError(str(exc).strip().splitlines()[0]) from None
    except (OSError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{path}: not an xtalgen model file ({_first_line(exc)})") from None
    return model, model_cfg, stats, path.resolve()


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours part of its messages
    if isinstance(exc, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        return "it holds Python objects, not only tensors; refused by the weights-only loader"
    lines = text.splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _check_same_checkpoint(out_dir: Path, checkpoint: Path) -> None:
    """A run directory's weights change as it trains: resuming an output directory with another
    checkpoint directory would mix two models (a model file is compared by its sha256 instead)."""
    from xtalgen.sampling.writer import REQUEST_NAME
    from xtalgen.schema import ConfigError

    if not checkpoint.is_dir():
        return
    try:
        previous = json.loads((out_dir / REQUEST_NAME).read_text())
    except (OSError, ValueError):
        return
    if previous.get("checkpoint") != str(checkpoint):
        raise ConfigError(f"{out_dir} holds samples of {previous.get('checkpoint')!r}, not of checkpoint "
                          f"{checkpoint}; use a new --out directory, or delete this one to start over")


def _sample_config(args: argparse.Namespace):
    """Config files, then dotted overrides, then the explicit flags (which win)."""
    from xtalgen.sampling.conditions import split_assignments
    from xtalgen.schema import load_config

    overrides = [o if o.split("=", 1)[0].split(".", 1)[0] in _SECTIONS else f"sample.{o}" for o in args.overrides]
    cfg = load_config(args.config, overrides).sample
    flags = {
        "num_samples": args.num_samples, "batch_size": args.batch_size, "num_steps": args.steps,
        "guidance_scale": args.guidance, "num_atoms": args.num_atoms, "seed": args.seed,
        "space_group": args.space_group, "templates": args.templates,
    }
    for name, value in flags.items():
        if value is not None:
            setattr(cfg, name, value)
    cfg.conditions = {**cfg.conditions, **split_assignments(args.condition)}
    cfg.checkpoint = args.checkpoint
    cfg.out = args.out
    _check_sample_config(cfg)
    return cfg


def _check_sample_config(cfg) -> None:
    from xtalgen.schema import ConfigError

    minimum = {"num_samples": 1, "batch_size": 1, "num_steps": 1, "corrector_steps": 0, "num_atoms": 0,
               "space_group": 0}
    for key, low in minimum.items():
        if getattr(cfg, key) < low:
            raise ConfigError(f"config key 'sample.{key}': must be >= {low}, got {getattr(cfg, key)}")
    if cfg.space_group > 230:
        raise ConfigError(f"config key 'sample.space_group': must be 1-230 (0: unconstrained), got {cfg.space_group}")
    # guidance_scale: 0 is the unconditional model, 1 the conditional one, above 1 extrapolates past it;
    # below 0 would push samples away from the condition asked for, which nobody means to request.
    in_range = {"coord_snr": (lambda v: v >= 0, ">= 0"), "lattice_snr": (lambda v: v >= 0, ">= 0"),
                "guidance_scale": (lambda v: v >= 0, ">= 0"), "time_power": (lambda v: v > 0, "> 0"),
                "eta": (lambda v: 0 <= v <= 1, "in [0, 1]")}
    for key, (ok, allowed) in in_range.items():
        value = getattr(cfg, key)
        if not math.isfinite(value) or not ok(value):
            raise ConfigError(f"config key 'sample.{key}': must be finite and {allowed}, got {value}")


def _warn_if_guidance_is_unused(args: argparse.Namespace, cfg, model_cfg) -> None:
    """Guidance mixes the conditional and unconditional predictions; with no condition there is only
    the unconditional one, so a scale the user set changes nothing and would otherwise go unnoticed
    (it is still recorded in request.json and samples.jsonl, as given)."""
    from xtalgen.sampling.driver import effective_conditions
    from xtalgen.schema import SampleConfig

    given = args.guidance is not None or cfg.guidance_scale != SampleConfig.guidance_scale
    if given and not effective_conditions(cfg, model_cfg):
        print(f"xtalgen: warning: guidance scale {cfg.guidance_scale:g} has no effect without a --condition: "
              "the samples are unconditional", file=sys.stderr)


def _merge_only(out_dir: Path) -> int:
    from xtalgen.sampling.writer import merge_parts
    from xtalgen.schema import ConfigError

    try:
        report = merge_parts(out_dir)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    return _report_merge(report)


def _report_merge(report) -> int:
    cifs = report.jsonl.parent / "cifs"
    print(f"{report.num_structures} structures: {report.jsonl}, {report.extxyz}, {cifs}/")
    if report.complete:
        return 0
    shown = ", ".join(map(str, report.missing_batches[:10])) + (" ..." if len(report.missing_batches) > 10 else "")
    print(
        f"incomplete: {len(report.missing_batches)} of {report.num_batches} batches missing ({shown}); "
        "rerun the same command to finish them (parts are merged again at the end)",
        file=sys.stderr,
    )
    return 1
