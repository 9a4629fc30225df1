"""Turn a (ZeRO-partitioned) training checkpoint into one weights-only model file.

Runs offline in one process, whatever the stage and number of ranks that wrote the checkpoint.
Weights: the EMA by default (gathered from every rank's partition for ZeRO-3), or the raw training
weights (`use_ema=False`), which come from DeepSpeed's fp32 consolidation for ZeRO 1-3
(`parallelize.gather_fp32_weights`, the one DeepSpeed import here) and from the module file for
stage 0.

The EMA path reads only weights-only files (`torch.load(weights_only=True)`) and never imports
DeepSpeed: the trainer's per-rank EMA partitions, plus DeepSpeed's model-states file(s) for the
entries the EMA does not track (buffers, frozen weights; under ZeRO-3 the frozen weights are
gathered from every rank's fragments). `xtalgen sample RUN_DIR` uses this path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from xtalgen.train import checkpoint as ckpt
from xtalgen.train.ema import gather_partitions

log = logging.getLogger("xtalgen.train")

MODULE_PREFIX = "model."  # parallelize.LossForward, the engine's wrapper, holds the model as `.model`


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v for k, v in state.items()}


def raw_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The training weights in fp32, consolidated over ranks."""
    partitioned = any(checkpoint_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if partitioned:
        from xtalgen.train.parallelize import gather_fp32_weights

        state = gather_fp32_weights(checkpoint_dir)
    else:
        module_file = checkpoint_dir / "mp_rank_00_model_states.pt"
        if not module_file.exists():
            raise FileNotFoundError(f"{checkpoint_dir}: neither ZeRO partitions nor {module_file.name}")
        state = torch.load(module_file, map_location="cpu", weights_only=True)["module"]
    return {k: (v.float() if v.is_floating_point() else v).detach() for k, v in _strip_prefix(state).items()}


def model_states_files(checkpoint_dir: Path) -> list[Path]:
    """DeepSpeed's model-states file(s): one for ZeRO 0-2, one per rank for ZeRO-3 (rank order)."""
    single = checkpoint_dir / "mp_rank_00_model_states.pt"
    if single.exists():
        return [single]
    per_rank = sorted(checkpoint_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"),
                      key=lambda p: int(p.name.split("_")[3]))
    if not per_rank:
        raise FileNotFoundError(f"{checkpoint_dir}: no DeepSpeed model-states file ({single.name})")
    return per_rank


def module_state_dict(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Size]]:
    """(state, full shapes) from the model-states file(s), weights-only and without DeepSpeed.

    Trainable weights partitioned by ZeRO-3 are empty placeholders here (the EMA supplies them);
    frozen weights partitioned by ZeRO-3 are put back together from every rank's fragments.
    """
    saved = [torch.load(f, map_location="cpu", weights_only=True) for f in model_states_files(checkpoint_dir)]
    first = saved[0]
    state = dict(first["module"])
    shapes: dict[str, torch.Size] = {}
    for group in first.get("param_shapes") or []:
        shapes.update(group)
    frozen = first.get("frozen_param_shapes") or {}
    shapes.update(frozen)
    for name, shape in frozen.items():
        if name in state and state[name].shape == shape:
            continue
        fragments = [s["frozen_param_fragments"][name].reshape(-1) for s in saved]
        state[name] = torch.cat(fragments).narrow(0, 0, torch.Size(shape).numel()).view(shape)
    state = {k: (v.float() if v.is_floating_point() else v).detach() for k, v in _strip_prefix(state).items()}
    return state, {k: torch.Size(v) for k, v in _strip_prefix(shapes).items()}


def ema_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA weights (trainable parameters only), whole tensors in fp32."""
    world = ckpt.saved_world_size(checkpoint_dir)
    states = [ckpt.load_rank_state(checkpoint_dir, rank)["ema"] for rank in range(world)]
    return _strip_prefix(gather_partitions(states))


def consolidated_state_dict(checkpoint_dir: Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Whole fp32 weights: the EMA over the model-states file (weights-only), or the raw weights."""
    if not use_ema:
        return raw_state_dict(checkpoint_dir)
    state, shapes = module_state_dict(checkpoint_dir)
    ema = ema_state_dict(checkpoint_dir)
    unknown = set(ema) - set(state)
    if unknown:
        raise ValueError(f"EMA names not in the model: {sorted(unknown)[:5]}")
    for name, value in ema.items():
        expected = shapes.get(name, state[name].shape)
        if value.shape != expected:
            raise ValueError(f"EMA {name}: shape {tuple(value.shape)} vs weights {tuple(expected)}")
    state.update(ema)
    for name, shape in shapes.items():  # a ZeRO-3 placeholder left over would load as garbage
        if state[name].shape != shape:
            raise ValueError(f"{checkpoint_dir}: {name} has shape {tuple(state[name].shape)}, expected "
                             f"{tuple(shape)} (partitioned weights the EMA does not hold)")
    return state


def find_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from a run dir, its `checkpoints/` dir, the `latest` file in it,
    or one checkpoint dir."""
    path = Path(source)
    if path.is_file() and path.name == ckpt.LATEST_FILE:  # the pointer file: its checkpoints dir
        path = path.parent
    checkpoint_dir = None
    if path.is_dir():
        try:
            checkpoint_dir = ckpt.resolve_checkpoint(str(path), path)
        except FileNotFoundError:
            checkpoint_dir = None
    if checkpoint_dir is None:
        raise FileNotFoundError(f"no checkpoint found at {source} (expected a run directory, its checkpoints/ "
                                "directory, the `latest` file in it, or one checkpoint directory)")
    return checkpoint_dir, checkpoint_dir.parent.parent


def consolidated_model(source: str | Path, use_ema: bool = True):
    """(model in eval mode, model config, stats, extra) from a run dir, its `checkpoints/` dir, the
    `latest` file in it, or one checkpoint dir; in memory, nothing written."""
    from xtalgen.models.diffusion import build_model
    from xtalgen.schema import load_config

    checkpoint_dir, run_dir = find_checkpoint(source)
    for name in ("config.yaml", "run.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_dir} is not inside a run directory ({run_dir / name} "
                                    "is missing)")
    cfg = load_config([run_dir / "config.yaml"])
    info = json.loads((run_dir / "run.json").read_text())
    stats = info["stats"]
    model = build_model(cfg.model, stats)
    from xtalgen.models.io import with_zero_additions

    model.load_state_dict(with_zero_additions(model, consolidated_state_dict(checkpoint_dir, use_ema)), strict=True)
    model.eval()
    step = int(ckpt.load_rank_state(checkpoint_dir, 0)["step"])
    extra = {"step": step, "weights": "ema" if use_ema else "raw", "checkpoint": str(checkpoint_dir),
             "manifest_hash": info.get("manifest_hash")}
    return model, cfg.model, stats, extra


def consolidate(source: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Write `out`, a model file for `xtalgen.models.io.load_model`, from a run or checkpoint."""
    from xtalgen.models.io import save_model

    model, model_cfg, stats, extra = consolidated_model(source, use_ema)
    return save_model(out, model, model_cfg, stats, extra=extra)
