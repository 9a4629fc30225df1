"""One nested, typed config tree for every command (OmegaConf structured configs).

YAML presets in `configs/` and dotted command-line overrides (`model.score_net.hidden=256`) are
merged onto these dataclasses; an unknown key or a wrong type is an error that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xtalgen.schema.data import (
    DataConfig,
    LoaderConfig,
    PropertyColumn,
    ReaderConfig,
    ShardConfig,
    ValidationConfig,
)
from xtalgen.schema.model import ConditionConfig, DiffusionConfig, ModelConfig, ScoreNetConfig
from xtalgen.schema.sample import EvaluateConfig, SampleConfig
from xtalgen.schema.train import FinetuneConfig, OptimConfig, TrainConfig, WandbConfig

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
]



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
    """Merge YAML files/presets then `a.b=c` overrides onto the schema; return a typed Config."""
    base = OmegaConf.structured(Config)
    try:
        for src in sources:
            path = preset_path(str(src))
            base = OmegaConf.merge(base, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    return OmegaConf.to_object(base)


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    return f"config key '{key}': {msg}" if key else msg


def to_yaml(cfg: Config | Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
