"""Training: the DeepSpeed engine (`trainer`), its config (`deepspeed_config`), checkpoints and
consolidation, EMA, launch environments (`distributed`), run logging (`metrics_log`), and the
`xtalgen train` command (`cli`). Heavy imports (DeepSpeed, W&B) happen only when used.

    from xtalgen.train.trainer import Trainer, EXIT_PREEMPTED
    trainer = Trainer(cfg, model, loader, stats=stats)   # model has .loss(batch) -> {"loss": ...}
    trainer.add_periodic_hook(1000, fn)                  # fn(trainer, step) -> metrics | None
    summary = trainer.fit()
"""
