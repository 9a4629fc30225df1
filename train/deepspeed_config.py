"""The DeepSpeed JSON, generated from the structured config (never written by hand).

The global batch (structures per optimizer step) is the quantity that defines a recipe, so it stays
fixed when the number of devices changes; gradient accumulation absorbs the difference:
accumulation = global / (micro x world), which must divide exactly.
"""

from __future__ import annotations

from typing import Any

from xtalgen.schema import ConfigError, TrainConfig


def gradient_accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """global / (micro x world); the one check left for run time, since it needs the world size
    (everything else in `train` was checked when the config loaded: `xtalgen.schema.load_config`)."""
    micro, total = train.micro_batch_structures, train.global_batch_structures
    if total % (micro * world_size):
        raise ConfigError(
            f"config key 'train.global_batch_structures': {total} is not divisible by "
            f"train.micro_batch_structures ({micro}) x world size ({world_size}); "
            f"choose a global batch that is a multiple of {micro * world_size}"
        )
    return total // (micro * world_size)


def _offload(device: str, nvme_path: str) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def build_deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config dict for this run. The optimizer is a client `torch.optim.AdamW`."""
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
