"""Single-file, weights-only model files for sampling and sharing.

A model file is `torch.save` of a dict holding only tensors and plain Python values:

    {"format": "xtalgen-model-v1", "config": <ModelConfig as YAML>, "stats": {...},
     "state_dict": {name: tensor}, "extra": {...}}

so it loads with `torch.load(weights_only=True)`: nothing in a file from a stranger can run code.
The config rebuilds the network (`build_model`), the stats carry the lattice prior's density and
the number-of-atoms histogram the sampler draws from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf

from xtalgen.models.diffusion import CrystalDiffusion, build_model, normalize_stats
from xtalgen.schema import ModelConfig

FORMAT = "xtalgen-model-v1"


def _plain(value, where: str = "stats"):
    """Recursively convert to types the weights-only unpickler accepts; refuse anything else."""
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (int, str)) else str(k)): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a weights-only model file")


def config_to_yaml(cfg: ModelConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_yaml(text: str) -> ModelConfig:
    """Parse a stored config onto the current schema (unknown keys are an error)."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.create(text))
    return OmegaConf.to_object(merged)


def save_model(
    path: str | os.PathLike,
    model: CrystalDiffusion,
    cfg: ModelConfig,
    stats: Mapping,
    extra: Mapping | None = None,
) -> Path:
    """Write the model atomically (temporary file + rename: a crash never leaves half a file)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "config": config_to_yaml(cfg),
        "stats": _plain(normalize_stats(stats)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": _plain(dict(extra or {}), "extra"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_model_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """The raw payload of a model file (weights-only load), after checking its format."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: not an xtalgen model file (format {found!r}, expected {FORMAT!r})")
    return payload


# Parts added to the architecture after models were saved, zero-initialised so that a model without
# them computes exactly what it did: a saved model that lacks them loads with their zeros.
ZERO_INITIALISED_ADDITIONS = ("score_net.type_adapter.", "score_net.element_set_gate.")


def with_zero_additions(model: CrystalDiffusion, state: dict) -> dict:
    """`state` plus the zero-initialised parts it predates (see ZERO_INITIALISED_ADDITIONS)."""
    own = model.state_dict()
    missing = {k: own[k] for k in own if k not in state and k.startswith(ZERO_INITIALISED_ADDITIONS)}
    if any(v.count_nonzero() for v in missing.values()):
        raise ValueError(f"{sorted(missing)[:3]} should start at zero")
    return {**state, **missing}


def load_model(path: str | os.PathLike, map_location="cpu") -> tuple[CrystalDiffusion, ModelConfig, dict]:
    """Rebuild a saved model in eval mode; returns (model, config, stats)."""
    payload = read_model_file(path, map_location)
    cfg = config_from_yaml(payload["config"])
    stats = payload["stats"]
    model = build_model(cfg, stats)
    float_dtypes = {v.dtype for v in payload["state_dict"].values() if v.is_floating_point()}
    if len(float_dtypes) == 1:  # keep the stored precision (e.g. a float64 model)
        model.to(dtype=float_dtypes.pop())
    model.load_state_dict(with_zero_additions(model, payload["state_dict"]), strict=True)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    model.eval()
    return model, cfg, stats
