"""The learning-rate schedule: linear warm-up, then plateau decay, constant, or cosine to `min_lr`.

A component of the trainer with its own `state_dict`/`load_state_dict` (the checkpoint manager
saves it under `schedule`). It steps once per optimizer step; plateau watches the loss average
(`metrics_log.LossAverage`) that the trainer passes in.
"""

from __future__ import annotations

import math

import torch

from xtalgen.schema import OptimConfig


class LRSchedule:
    """Linear warm-up, then plateau decay (on the loss average), constant, or cosine to `min_lr`."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
        self.kind, self.warmup_steps, self.steps = cfg.scheduler, cfg.warmup_steps, 0
        min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        decay_steps = max(1, max_steps - cfg.warmup_steps)

        def factor(step: int) -> float:  # step = optimizer steps already taken
            warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
            if self.kind != "cosine" or step < cfg.warmup_steps:
                return warm
            progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
            return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.plateau = None
        if self.kind == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                min_lr=cfg.min_lr,
            )

    def step(self, loss_average: float) -> None:
        self.steps += 1
        # LambdaLR rewrites the lr from the base each step, so after warm-up it must stop
        # stepping when the plateau schedule owns the lr.
        if self.plateau is None or self.steps <= self.warmup_steps:
            self.lambda_lr.step()
        else:
            self.plateau.step(loss_average)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "lambda_lr": self.lambda_lr.state_dict(),
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.lambda_lr.load_state_dict(state["lambda_lr"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
