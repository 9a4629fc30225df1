"""Config of training: DeepSpeed engine, optimisation, checkpoints, logging.

Enumerations are `Literal` types, which OmegaConf checks when the config loads; `validate_train`
checks what types cannot say (ranges, options that need each other). Both run in `load_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

ZeroStage = Literal[0, 1, 2, 3]
Precision = Literal["fp32", "bf16"]
OffloadDevice = Literal["none", "cpu", "nvme"]
Scheduler = Literal["plateau", "constant", "cosine"]
WandbMode = Literal["auto", "online", "offline", "disabled"]


@dataclass
class OptimConfig:
    lr: float = 1e-4  # MatterGen
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.5  # MatterGen
    scheduler: Scheduler = "plateau"
    plateau_factor: float = 0.6  # MatterGen
    plateau_patience: int = 100
    warmup_steps: int = 0
    min_lr: float = 1e-6  # floor of the plateau / cosine schedules (MatterGen plateau min_lr)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "xtalgen"
    entity: str = ""
    mode: WandbMode = "auto"  # auto: offline without key/network
    # Seconds an online run may take to start; past it (or on any error) the run logs offline.
    # W&B's own default is 90 s, spent in full whenever a proxy or firewall swallows the connection.
    init_timeout_s: float = 15.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    max_steps: int = 1000
    global_batch_structures: int = 512  # MatterGen: 2 nodes x 8 GPUs x 32
    micro_batch_structures: int = 32
    zero_stage: ZeroStage = 0
    precision: Precision = "fp32"
    offload_optimizer: OffloadDevice = "none"
    offload_param: OffloadDevice = "none"
    # Recompute each score-network layer in the backward pass instead of keeping its activations:
    # the same results for a fraction of the activation memory, at ~1/3 more compute. Presets whose
    # micro batch does not fit a GPU's memory (large, xl) may set it.
    activation_checkpointing: bool = False
    ema_decay: float = 0.999
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str = "none"  # none | auto | PATH
    seed: int = 0
    debug: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Periodic sampling with SUN metrics during training (0 = off).
    sample_every: int = 0
    sample_count: int = 16
    sample_steps: int = 50  # diffusion steps of the periodic pass (few: it runs often)
    sample_relax: bool = False  # also relax + energy above hull (stability, SUN); slow on CPU
    # Non-finite loss: the batch is skipped (on every rank) at most this many times, then the run stops.
    max_nonfinite_skips: int = 10
    offload_nvme_path: str = ""  # required when offload_optimizer/offload_param is nvme


@dataclass
class FinetuneConfig:
    """`xtalgen finetune BASE RECIPE`: the model to start from and what of it trains.

    The network and diffusion settings are the base model's; a recipe adds `model.conditions`
    (and `model.condition_dropout`). Properties enter through per-layer adapters whose last layer
    starts at zero, so step 0 reproduces the base bit for bit.
    """

    base: str = ""  # model file, or a training run directory (its latest checkpoint's EMA weights)
    # False: adapters and property embeddings train, the base is frozen (bit-identical after training).
    # True: every weight trains (MatterGen's default, with its lr 5e-6).
    full: bool = False
    # Subset index (`xtalgen shard subset`) of the labelled records to train on, by name or path.
    # "" = the records of data.train_split carrying every conditioned property, made on first use.
    subset: str = ""
    max_labels: int | None = None  # with subset "": keep at most this many labelled records (None: all)
    subset_seed: int = 0  # hash order of the kept records (nested: 500 of seed s lie inside 1,500)


def validate_train(train: TrainConfig, fail: Callable[[str, str], Exception]) -> None:
    """What the types cannot check; `fail(key, message)` makes the exception to raise."""
    if train.offload_optimizer != "none" and train.zero_stage == 0:
        raise fail("train.offload_optimizer", "optimizer offload needs train.zero_stage >= 1")
    if train.offload_param != "none" and train.zero_stage != 3:
        raise fail("train.offload_param", "parameter offload needs train.zero_stage = 3")
    if "nvme" in (train.offload_optimizer, train.offload_param) and not train.offload_nvme_path:
        raise fail("train.offload_nvme_path", "required when offloading to nvme")
    for key in ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "micro_batch_structures",
                "global_batch_structures"):
        if getattr(train, key) <= 0:
            raise fail(f"train.{key}", f"must be > 0, got {getattr(train, key)}")
    if not 0.0 <= train.ema_decay < 1.0:
        raise fail("train.ema_decay", f"must be in [0, 1), got {train.ema_decay}")
    if not 0.0 < train.wandb.init_timeout_s < float("inf"):
        raise fail("train.wandb.init_timeout_s", f"must be > 0 seconds, got {train.wandb.init_timeout_s}")
