"""One nested, typed config tree for every command (OmegaConf structured configs).

YAML presets in `configs/` and dotted command-line overrides (`model.score_net.hidden=256`) are
merged onto these dataclasses; an unknown key or a wrong type is an error that names the key.

The config is checked once, when it loads (`load_config`): OmegaConf checks the types, choices
included (they are `Literal[...]` types), and `validate` what types cannot say (ranges, options
that need each other). Code that receives a loaded `Config` does not check it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xtalgen.schema.data import (
    DataConfig,
    LoaderConfig,
    PropertyColumn,
    ReaderConfig,
    ShardConfig,
    ValidationConfig,
)
from xtalgen.schema.model import ConditionConfig, DiffusionConfig, ModelConfig, ScoreNetConfig, validate_model
from xtalgen.schema.sample import EvaluateConfig, SampleConfig, validate_evaluate
from xtalgen.schema.train import FinetuneConfig, OptimConfig, TrainConfig, WandbConfig, validate_train

__all__ = [
    "Config",
    "ConfigError",
    "ConditionConfig",
    "DataConfig",
    "DiffusionConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "LoaderConfig",
    "ModelConfig",
    "OptimConfig",
    "PropertyColumn",
    "ReaderConfig",
    "SampleConfig",
    "ScoreNetConfig",
    "ShardConfig",
    "TrainConfig",
    "ValidationConfig",
    "WandbConfig",
    "load_config",
    "preset_path",
    "save_config",
    "validate",
]

# Keys that are no longer config keys: what to do instead. Files written before (a run's config.yaml)
# still load when they hold the old default, which is dropped.
RETIRED_KEYS = {
    "train.debug_inject_nan_step": (0, "a test hook now: set the environment variable "
                                       "XTALGEN_DEBUG_INJECT_NAN_STEP instead"),
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


class ConfigError(ValueError):
    """A config problem, with the offending key in the message."""


def preset_path(name: str, folder: str = "") -> Path:
    """Resolve a preset name (`debug`; in `folder`, e.g. `finetune`) or a YAML path to a file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    from importlib import resources

    root = resources.files("xtalgen.configs")
    packaged = (root / folder if folder else root) / f"{name}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    kind = f"{folder} recipe" if folder else "preset"
    known = sorted(p.name[: -len(".yaml")] for p in (root / folder if folder else root).iterdir()
                   if p.name.endswith(".yaml"))
    raise ConfigError(f"no config file or {kind} named {name!r} (known: {', '.join(known)})")


def load_config(sources: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML files/presets then `a.b=c` overrides onto the schema; return a typed, checked
    Config (a wrong key, type, choice or value is a ConfigError naming the key)."""
    base = OmegaConf.structured(Config)
    try:
        for src in sources:
            path = preset_path(str(src))
            base = OmegaConf.merge(base, _without_retired_keys(OmegaConf.load(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            base = OmegaConf.merge(base, _without_retired_keys(OmegaConf.from_dotlist(list(overrides))))
        cfg = OmegaConf.to_object(base)
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """What the types cannot check (ranges, options that need each other); raises ConfigError
    naming the key. `load_config` calls it; call it on a Config built in code."""
    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"config key '{key}': {message}")

    validate_model(cfg.model, fail)
    validate_train(cfg.train, fail)
    validate_evaluate(cfg.evaluate, fail)


def _without_retired_keys(node: DictConfig) -> DictConfig:
    """Drop a retired key that holds its old default; refuse one set to anything else."""
    for key, (old_default, instead) in RETIRED_KEYS.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(node, parent_key, default=None)
        if isinstance(parent, DictConfig) and leaf in parent:
            if parent[leaf] != old_default:
                raise ConfigError(f"config key '{key}': no longer a config key; {instead}")
            del parent[leaf]
    return node


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    return f"config key '{key}': {msg}" if key else msg


def to_yaml(cfg: Config | Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
