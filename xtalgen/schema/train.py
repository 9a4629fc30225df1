"""Config of training: DeepSpeed engine, optimisation, checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    lr: float = 1e-4  # MatterGen
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 0.5  # MatterGen
    scheduler: str = "plateau"  # plateau | constant | cosine
    plateau_factor: float = 0.6  # MatterGen
    plateau_patience: int = 100
    warmup_steps: int = 0
    min_lr: float = 1e-6  # floor of the plateau / cosine schedules (MatterGen plateau min_lr)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "xtalgen"
    entity: str = ""
    mode: str = "auto"  # auto (offline without key/network) | online | offline | disabled
    # Seconds an online run may take to start; past it (or on any error) the run logs offline.
    # W&B's own default is 90 s, spent in full whenever a proxy or firewall swallows the connection.
    init_timeout_s: float = 15.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    max_steps: int = 1000
    global_batch_structures: int = 512  # MatterGen: 2 nodes x 8 GPUs x 32
    micro_batch_structures: int = 32
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"
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
    debug_inject_nan_step: int = 0  # test hook: rank 0's loss at this step becomes NaN (0 = off)
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
