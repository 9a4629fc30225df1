"""Training: the loop (`trainer`) over components — everything that touches DeepSpeed
(`parallelize`, the only module importing it), its JSON config (`deepspeed_config`), the LR
schedule (`lr_schedule`), run logging and the loss average (`metrics_log`), EMA (`ema`), the
checkpoint manager (`checkpoint`) and consolidation, launch environments (`distributed`) — and the
`xtalgen train` / `xtalgen finetune` commands (`cli`, `finetune`). Heavy imports (DeepSpeed, W&B)
happen only when used.

    from xtalgen.train.trainer import Trainer, EXIT_PREEMPTED
    trainer = Trainer(cfg, model, loader, stats=stats)   # model has .loss(batch) -> {"loss": ...}
    trainer.add_periodic_hook(1000, fn)                  # fn(trainer, step) -> metrics | None
    summary = trainer.fit()
"""
