"""Turn a (ZeRO-partitioned) training checkpoint into one weights-only model file.

Runs offline in one process, whatever the stage and number of ranks that wrote the checkpoint.
Weights: the EMA by default (gathered from every rank's partition for ZeRO-3), or the raw training
weights (`use_ema=False`), which come from DeepSpeed's fp32 consolidation for ZeRO 1-3 and from the
module file for stage 0. Entries the EMA does not track (buffers, frozen weights) come from the raw
weights in both cases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from xtalgen.train import checkpoint as ckpt
from xtalgen.train.ema import gather_partitions

log = logging.getLogger("xtalgen.train")

MODULE_PREFIX = "model."  # the trainer's LossForward wrapper holds the model as `.model`


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k: v for k, v in state.items()}


def raw_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The training weights in fp32, consolidated over ranks."""
    partitioned = any(checkpoint_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if partitioned:
        import contextlib
        import io

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    else:
        module_file = checkpoint_dir / "mp_rank_00_model_states.pt"
        if not module_file.exists():
            raise FileNotFoundError(f"{checkpoint_dir}: neither ZeRO partitions nor {module_file.name}")
        state = torch.load(module_file, map_location="cpu", weights_only=True)["module"]
    return {k: (v.float() if v.is_floating_point() else v).detach() for k, v in _strip_prefix(state).items()}


def ema_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA weights (trainable parameters only), whole tensors in fp32."""
    world = ckpt.saved_world_size(checkpoint_dir)
    states = [ckpt.load_rank_state(checkpoint_dir, rank)["ema"] for rank in range(world)]
    return _strip_prefix(gather_partitions(states))


def consolidated_state_dict(checkpoint_dir: Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    state = raw_state_dict(checkpoint_dir)
    if use_ema:
        ema = ema_state_dict(checkpoint_dir)
        unknown = set(ema) - set(state)
        if unknown:
            raise ValueError(f"EMA names not in the model: {sorted(unknown)[:5]}")
        for name, value in ema.items():
            if value.shape != state[name].shape:
                raise ValueError(f"EMA {name}: shape {tuple(value.shape)} vs weights {tuple(state[name].shape)}")
        state.update(ema)
    return state


def find_checkpoint(source: str | Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from a run dir, its `checkpoints/` dir, or one checkpoint dir."""
    path = Path(source)
    checkpoint_dir = ckpt.resolve_checkpoint(str(path), path)
    if checkpoint_dir is None:
        raise FileNotFoundError(f"no checkpoint found at {source}")
    return checkpoint_dir, checkpoint_dir.parent.parent


def consolidate(source: str | Path, out: str | Path, use_ema: bool = True) -> Path:
    """Write `out`, a model file for `xtalgen.models.io.load_model`, from a run or checkpoint."""
    from xtalgen.models.diffusion import build_model
    from xtalgen.models.io import save_model
    from xtalgen.schema import load_config

    checkpoint_dir, run_dir = find_checkpoint(source)
    cfg = load_config([run_dir / "config.yaml"])
    info = json.loads((run_dir / "run.json").read_text())
    stats = info["stats"]
    model = build_model(cfg.model, stats)
    model.load_state_dict(consolidated_state_dict(checkpoint_dir, use_ema), strict=True)
    step = int(ckpt.load_rank_state(checkpoint_dir, 0)["step"])
    extra = {"step": step, "weights": "ema" if use_ema else "raw", "checkpoint": str(checkpoint_dir),
             "manifest_hash": info.get("manifest_hash")}
    return save_model(out, model, cfg.model, stats, extra=extra)
