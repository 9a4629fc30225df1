"""The DeepSpeed JSON, generated from the structured config (never written by hand).

The global batch (structures per optimizer step) is the quantity that defines a recipe, so it stays
fixed when the number of devices changes; gradient accumulation absorbs the difference:
accumulation = global / (micro x world), which must divide exactly.
"""

from __future__ import annotations

from typing import Any

from xtalgen.schema import ConfigError, TrainConfig

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def gradient_accumulation_steps(train: TrainConfig, world_size: int) -> int:
    micro, total = train.micro_batch_structures, train.global_batch_structures
    if micro <= 0:
        raise ConfigError(f"config key 'train.micro_batch_structures': must be > 0, got {micro}")
    if total <= 0 or total % (micro * world_size):
        raise ConfigError(
            f"config key 'train.global_batch_structures': {total} is not divisible by "
            f"train.micro_batch_structures ({micro}) x world size ({world_size}); "
            f"choose a global batch that is a multiple of {micro * world_size}"
        )
    return total // (micro * world_size)


def validate_train_config(train: TrainConfig) -> None:
    """Reject values DeepSpeed would misread later, naming the key."""
    checks = [
        ("train.zero_stage", train.zero_stage, ZERO_STAGES),
        ("train.precision", train.precision, PRECISIONS),
        ("train.offload_optimizer", train.offload_optimizer, OFFLOAD_DEVICES),
        ("train.offload_param", train.offload_param, OFFLOAD_DEVICES),
        ("train.optim.scheduler", train.optim.scheduler, ("plateau", "constant", "cosine")),
        ("train.wandb.mode", train.wandb.mode, ("auto", "online", "offline", "disabled")),
    ]
    for key, value, allowed in checks:
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(allowed)}")
    if train.offload_optimizer != "none" and train.zero_stage == 0:
        raise ConfigError("config key 'train.offload_optimizer': optimizer offload needs train.zero_stage >= 1")
    if train.offload_param != "none" and train.zero_stage != 3:
        raise ConfigError("config key 'train.offload_param': parameter offload needs train.zero_stage = 3")
    if "nvme" in (train.offload_optimizer, train.offload_param) and not train.offload_nvme_path:
        raise ConfigError("config key 'train.offload_nvme_path': required when offloading to nvme")
    for key, value in [("train.max_steps", train.max_steps), ("train.log_every", train.log_every),
                       ("train.checkpoint_every", train.checkpoint_every),
                       ("train.keep_checkpoints", train.keep_checkpoints)]:
        if value <= 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {value}")
    if not 0.0 <= train.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay': must be in [0, 1), got {train.ema_decay}")
    if not 0.0 < train.wandb.init_timeout_s < float("inf"):
        raise ConfigError(f"config key 'train.wandb.init_timeout_s': must be > 0 seconds, got {train.wandb.init_timeout_s}")


def _offload(device: str, nvme_path: str) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def build_deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config dict for this run. The optimizer is a client `torch.optim.AdamW`."""
    validate_train_config(train)
    accumulation = gradient_accumulation_steps(train, world_size)
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if train.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(train.offload_optimizer, train.offload_nvme_path)
    if train.offload_param != "none":
        zero["offload_param"] = _offload(train.offload_param, train.offload_nvme_path)
    if train.zero_stage == 3:
        # Consolidation rebuilds whole weights from the fp32 partitions, so skip the 16-bit gather.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        # Batches are built by an atom budget, so the structure counts here are nominal bookkeeping.
        "train_batch_size": train.global_batch_structures,
        "train_micro_batch_size_per_gpu": train.micro_batch_structures,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": False},
        # The client optimizer is torch AdamW (no fused/CPU-Adam build); allow it with ZeRO and offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
