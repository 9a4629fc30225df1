"""Fine-tuning: a pre-trained model gains property adapters and trains on a labelled subset.

`xtalgen finetune BASE RECIPE` is `xtalgen train` (the same Trainer, DeepSpeed engine, ZeRO stages,
checkpoints, resume, preemption, W&B and periodic sampling) with its inputs prepared here:

1. **Model.** The base's network and diffusion settings and weights, with the recipe's
   `model.conditions` entering through per-layer adapters whose last layer starts at zero: at step
   0 the fine-tuned model is the base, bit for bit. By default only the adapters and the property
   embeddings train (`finetune.full=false`); the base stays bit-identical.
2. **Data.** A property subset (`xtalgen shard subset`): an index of the records that carry every
   conditioned property, optionally capped at `finetune.max_labels` (MatterGen's 5k...605k sets).
   The loader reads only those records. The counts are printed.
3. **Statistics.** Each scalar property is standardised by the subset's mean and std, and its
   1,001 quantiles go into the model's stats, from which `xtalgen sample --condition 'x>=3'` draws
   range targets.

The run directory's run.json records the base: its path and sha256 (a run-directory base is first
consolidated into RUN_DIR/base.pt, which is what the hash is of). Resuming with another base is
refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from xtalgen.sampling.conditions import QUANTILES_KEY  # where range targets read the distribution
from xtalgen.schema import Config, ConfigError, ModelConfig
from xtalgen.train.distributed import barrier, init_distributed, stop_together
from xtalgen.train.trainer import Trainer, sha256_file

log = logging.getLogger("xtalgen.train")

BASE_FILE = "base.pt"  # a run-directory base, consolidated (EMA weights) into the fine-tuning run
ADAPTED_PREFIXES = ("score_net.adapters.", "score_net.type_adapter.", "score_net.element_set_gate.",
                    "score_net.conditioning.")  # what the base does not have


@dataclass
class BaseModel:
    path: Path  # the model file the weights come from
    sha256: str
    source: str  # BASE as given
    config: ModelConfig
    stats: dict
    state_dict: dict[str, torch.Tensor]


def build_finetune_trainer(cfg: Config) -> Trainer:
    """The Trainer for `xtalgen finetune`: base + adapters over the property subset (module docstring)."""
    from xtalgen.datasets.loader import CrystalLoader
    from xtalgen.models.diffusion import build_model
    from xtalgen.train.build import attach_periodic_sampling, check_inputs

    check_finetune_inputs(cfg)
    check_inputs(cfg)
    dist_info = init_distributed()
    run_dir = Path(cfg.train.run_dir)
    base_path = _together(lambda: base_file(cfg.finetune.base, run_dir, write=dist_info.is_main), main_first=True)
    base = _together(lambda: read_base(base_path, cfg.finetune.base))
    _together(lambda: _check_same_base(run_dir, base, resuming=cfg.train.resume not in ("", "none")))
    cfg.model = finetune_model_config(base.config, cfg.model)  # what config.yaml records and rebuilds
    subset = _together(lambda: resolve_subset(cfg, make=dist_info.is_main), main_first=True)
    if dist_info.is_main:
        print(describe_subset(subset, cfg), flush=True)
    loader = CrystalLoader.from_config(
        cfg.data.shards, cfg.data.loader, split=cfg.data.train_split,
        batch_size=cfg.train.micro_batch_structures,
        rank=dist_info.rank, world_size=dist_info.world_size,
        subset=subset["path"], property_names=[c.name for c in cfg.model.conditions],
    )
    stats = dict(base.stats)
    values = subset["splits"][cfg.data.train_split].get("values", {})
    stats[QUANTILES_KEY] = {c.name: values[c.name]["quantiles"] for c in cfg.model.conditions
                            if c.kind == "scalar"}
    torch.manual_seed(cfg.train.seed)  # identical adapter initialisation on every rank
    model = build_model(cfg.model, stats)
    load_base_weights(model, base.state_dict)
    standardise_scalars(model, cfg.model, values)
    if not cfg.finetune.full:
        model.score_net.freeze_base()
    run_info = {"finetune": {"base": str(base.path), "base_sha256": base.sha256, "base_source": base.source,
                             "subset": subset["name"], "labelled_records": subset["count"],
                             "full": cfg.finetune.full}}
    trainer = Trainer(cfg, model, loader, dist_info=dist_info, stats=stats, run_info=run_info)
    if cfg.train.sample_every > 0:
        attach_periodic_sampling(trainer, cfg)
    return trainer


def _together(make, main_first: bool = False):
    """Run `make()` on every rank, stopping all ranks together if any fails (one message).

    `main_first`: rank 0 runs first (it may write a file the others then read)."""
    result, error = None, None
    if main_first and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        barrier()
    try:
        result = make()
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        error = exc if isinstance(exc, ConfigError) else ConfigError(str(exc))
    if main_first and torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
        barrier()
    stop_together(error)
    return result


def check_finetune_inputs(cfg: Config) -> None:
    """What a fine-tuning run refuses before any rank starts (`xtalgen finetune --check` too)."""
    if not cfg.finetune.base:
        raise ConfigError("config key 'finetune.base': give the base model (a model.pt or a run directory)")
    if not Path(cfg.finetune.base).exists():
        raise ConfigError(f"config key 'finetune.base': {cfg.finetune.base} does not exist")
    if not cfg.model.conditions:
        raise ConfigError("config key 'model.conditions': a fine-tuning recipe names at least one property "
                          "(see configs/finetune/)")
    if cfg.finetune.max_labels is not None and cfg.finetune.max_labels < 1:
        raise ConfigError("config key 'finetune.max_labels': must be >= 1 (or null for all)")
    if cfg.finetune.subset and cfg.finetune.max_labels is not None:
        raise ConfigError("config keys 'finetune.subset' and 'finetune.max_labels': give one (a named subset "
                          "already has its size)")


def base_file(source: str, run_dir: Path, write: bool) -> Path:
    """The base's model file. A run directory (or one of its checkpoints) is consolidated once into
    RUN_DIR/base.pt (EMA weights) by the rank that may `write`; the others then read that file."""
    path = Path(source)
    if not (path.is_dir() or path.name == "latest"):
        return path
    if path.is_dir() and (path / "model.pt").is_file() and not (path / "checkpoints").is_dir():
        return path / "model.pt"  # a directory holding just a model file
    target = run_dir / BASE_FILE
    if write and not target.exists():
        from xtalgen.models.io import save_model
        from xtalgen.train.consolidate import consolidated_model

        model, model_cfg, stats, extra = consolidated_model(source)
        save_model(target, model, model_cfg, stats, extra={**extra, "consolidated_for": "finetune"})
    return target


def read_base(path: Path, source: str) -> BaseModel:
    """The base model's config, stats and weights (weights-only read); it must be unconditional."""
    from xtalgen.models.io import config_from_yaml, read_model_file

    try:
        payload = read_model_file(path)
    except (RuntimeError, EOFError, OSError) as exc:  # not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config key 'finetune.base': {path} is not an xtalgen model file ({first})") from None
    model_cfg = config_from_yaml(payload["config"])
    if model_cfg.conditions:
        names = ", ".join(c.name for c in model_cfg.conditions)
        raise ConfigError(f"config key 'finetune.base': {source} is already conditioned on {names}; fine-tuning "
                          "starts from an unconditional base model")
    return BaseModel(path, sha256_file(path), str(source), model_cfg, dict(payload["stats"]),
                     payload["state_dict"])


def _check_same_base(run_dir: Path, base: BaseModel, resuming: bool) -> None:
    info_path = run_dir / "run.json"
    if not resuming or not info_path.exists():
        return
    recorded = json.loads(info_path.read_text()).get("finetune", {}).get("base_sha256")
    if recorded and recorded != base.sha256:
        raise ConfigError(f"config key 'finetune.base': {run_dir} was fine-tuned from another base (sha256 "
                          f"{recorded[:12]}…, now {base.sha256[:12]}…); resume it with the same base")


def finetune_model_config(base: ModelConfig, recipe: ModelConfig) -> ModelConfig:
    """The base's network and diffusion with the recipe's conditions, through adapters."""
    return replace(base, conditions=list(recipe.conditions), condition_dropout=recipe.condition_dropout,
                   adapters=True)


def load_base_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the base's weights; only the adapters and property embeddings may be new."""
    result = model.load_state_dict(state, strict=False)
    new = [k for k in result.missing_keys if not k.startswith(ADAPTED_PREFIXES)]
    if new or result.unexpected_keys:
        raise ConfigError(f"config key 'finetune.base': the base's weights do not fit its own config "
                          f"(missing {new[:3]}, unexpected {result.unexpected_keys[:3]})")


def standardise_scalars(model: torch.nn.Module, model_cfg: ModelConfig, values: dict) -> None:
    """(x - mean) / std of each scalar property over the subset's records."""
    for cond in model_cfg.conditions:
        if cond.kind != "scalar":
            continue
        if cond.name not in values:
            raise ConfigError(f"property {cond.name!r} has no value statistics in the subset; remake it with "
                              f"`xtalgen shard subset DIR --property {cond.name}`, or is it not numeric?")
        stats = values[cond.name]
        std = stats["std"] if stats["std"] > 0 else 1.0  # one distinct value: standardise by 1
        model.score_net.conditioning.set_normalization(cond.name, stats["mean"], std)


def resolve_subset(cfg: Config, make: bool) -> dict:
    """The subset this run trains on: `finetune.subset` by name or path, else the records carrying
    every conditioned property (made by rank 0 when missing; same hash order, so reruns agree).
    Returns the subset payload plus its `name` and `path`."""
    from xtalgen.sharding import load_subset, make_subset
    from xtalgen.sharding.subset import SUBSET_DIR, property_list, subset_name

    shards = Path(cfg.data.shards)
    names = [c.name for c in cfg.model.conditions]
    split = cfg.data.train_split
    if cfg.finetune.subset:
        reference = cfg.finetune.subset
    else:
        reference = subset_name(names, cfg.finetune.max_labels)
        path = shards / SUBSET_DIR / f"{reference}.json"
        if make and not _current_subset(shards, path, split, cfg.finetune.subset_seed):
            make_subset(shards, names, max_n=cfg.finetune.max_labels, split=split, seed=cfg.finetune.subset_seed,
                        progress=True)
    payload = load_subset(shards, reference)
    carried = set(payload.get("properties") or property_list(payload["property"]))
    missing = [n for n in names if n not in carried]
    if missing:
        raise ConfigError(f"config key 'finetune.subset': {reference} selects records carrying "
                          f"{' and '.join(sorted(carried))}, not {' and '.join(missing)}")
    if split not in payload["splits"]:
        raise ConfigError(f"config key 'finetune.subset': {reference} has no {split!r} split")
    path = Path(reference) if Path(reference).suffix == ".json" else shards / SUBSET_DIR / f"{reference}.json"
    return {**payload, "name": path.stem, "path": str(path), "count": payload["splits"][split]["count"],
            "available": payload["splits"][split]["available"]}


def _current_subset(shards: Path, path: Path, split: str, seed: int) -> bool:
    """A subset file made for this build, split and seed, with value statistics: reuse it."""
    from xtalgen.sharding import load_subset

    if not path.exists():
        return False
    try:
        payload = load_subset(shards, path)
    except ValueError:  # made from another build of the shards
        return False
    info = payload["splits"].get(split)
    return info is not None and payload.get("seed") == seed and "values" in info


def describe_subset(subset: dict, cfg: Config) -> str:
    names = " and ".join(c.name for c in cfg.model.conditions)
    mode = "full fine-tuning" if cfg.finetune.full else "adapters only, base frozen"
    return (f"fine-tuning on {subset['count']:,} of the {subset['available']:,} {cfg.data.train_split} records "
            f"carrying {names} (subset {subset['name']}; {mode})")
