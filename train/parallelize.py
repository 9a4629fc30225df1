"""DeepSpeed in one place: the only module of `xtalgen.train` that imports DeepSpeed (an import
contract in pyproject.toml keeps it so).

Small functions in the torchtitan manner, each doing one thing to a model or an engine:

    init_process_group(backend, timeout)        torch.distributed through DeepSpeed's comm layer
    apply_activation_checkpointing(model)       recompute layers in the backward pass
    build_optimizer(module, optim)              AdamW over the trainable parameters
    build_engine(model, optim, ds_config)       LossForward wrapper + deepspeed.initialize
    save_engine_checkpoint / load_engine_checkpoint   DeepSpeed's own checkpoint files
    unreported_grad_norm / reported_grad_norm   the global gradient norm, whoever computes it
    is_partitioned / local_tensor / full_shape  what a rank holds of a (ZeRO-3) parameter
    gather_fp32_weights(checkpoint_dir)         DeepSpeed's offline fp32 consolidation
    deepspeed_version()                         for run.json

DeepSpeed itself is imported inside the functions that need it: importing this module (the EMA and
the weights-only consolidation path do) costs nothing and never loads DeepSpeed.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xtalgen.batch import CrystalBatch
from xtalgen.schema import ConfigError, OptimConfig

log = logging.getLogger("xtalgen.train")


# --- process group -------------------------------------------------------------------------------
def accelerator_name() -> str:
    """`cuda` where DeepSpeed finds a GPU, else `cpu`."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def set_accelerator_device(local_rank: int) -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(local_rank)


def accelerator_device(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(local_rank))


def init_process_group(backend: str, timeout_minutes: float) -> None:
    """torch.distributed through DeepSpeed's comm layer (the environment names rank and world)."""
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        verbose=False,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


# --- the model and its engine --------------------------------------------------------------------
class LossForward(nn.Module):
    """Routes DeepSpeed's `engine(batch)` to `model.loss(batch)`, so ZeRO-3 hooks see a forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: CrystalBatch) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Switch activation checkpointing on in every submodule that offers it (the score network's
    `activation_checkpointing`: each layer recomputed in the backward pass, identical results, a
    fraction of the activation memory). Returns how many modules took the setting."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = True
            switched += 1
    if not switched:
        log.warning("train.activation_checkpointing=true, but %s has no layer that supports it; ignored",
                    type(model).__name__)
    return switched


def build_optimizer(module: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """A client torch AdamW over the trainable parameters: no fused/CPU-Adam build, the same
    numerics on CPU and GPU."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def build_engine(model: nn.Module, optim: OptimConfig, ds_config: dict[str, Any]):
    """(engine, optimizer): the model behind `LossForward`, AdamW, `deepspeed.initialize`."""
    import deepspeed

    wrapped = LossForward(model)
    optimizer = build_optimizer(wrapped, optim)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine, optimizer


def destroy_engine(engine) -> None:
    """Release the engine (lets one process run several trainers, e.g. in tests)."""
    with contextlib.suppress(Exception):
        engine.destroy()


# --- gradient norm -------------------------------------------------------------------------------
def unreported_grad_norm(engine, zero_stage: int, precision: str) -> float | None:
    """The 2-norm of all gradients, where DeepSpeed does not keep it: plain fp32 stage 0 clips
    without storing it. Call at the accumulation boundary, before `engine.step()`. None where
    DeepSpeed reports it (ZeRO, bf16): `reported_grad_norm` after the step."""
    if zero_stage > 0 or precision != "fp32":
        return None
    norms = [p.grad.norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def reported_grad_norm(engine) -> float:
    reported = engine.get_global_grad_norm()
    return float(reported) if reported is not None else float("nan")


# --- DeepSpeed's checkpoint files ----------------------------------------------------------------
def save_engine_checkpoint(engine, root: Path, tag: str, client_state: dict) -> None:
    """Model/optimizer files (ZeRO partitions per rank) under `root/tag`; writes `root/latest` last."""
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)


def load_engine_checkpoint(engine, checkpoint_dir: Path) -> None:
    """Weights and optimizer state from `checkpoint_dir` (the LR schedule is the trainer's own)."""
    try:
        load_path, _ = engine.load_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
    except RuntimeError as error:
        if "Missing key(s)" not in str(error):
            raise
        # A network part added since the checkpoint was written (a zero-initialised addition such as the
        # element-set gate): its optimizer state cannot be made up, so the run cannot go on exactly.
        raise ConfigError(f"{checkpoint_dir} was written by an xtalgen whose network lacks parts this one has "
                          f"({str(error).split('Missing key(s) in state_dict: ')[-1].split(',')[0]}, …); it cannot "
                          f"resume. Keep its weights with `xtalgen train consolidate`, and start the run again") from None
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {checkpoint_dir}")


def gather_fp32_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO 1-3 checkpoint, gathered from every rank's partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)


# --- what a rank holds of a parameter (ZeRO-3 partitions) ---------------------------------------
def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitioned this parameter (a rank then holds a flat slice, `ds_tensor`)."""
    return hasattr(param, "ds_tensor")


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """What this rank owns of a parameter: the whole tensor, or its ZeRO-3 flat partition."""
    return param.ds_tensor if is_partitioned(param) else param.data


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's whole shape, also when ZeRO-3 left only an empty placeholder here."""
    return param.ds_shape if is_partitioned(param) else param.shape
