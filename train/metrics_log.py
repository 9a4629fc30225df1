"""Run logging on rank 0: `metrics.jsonl` (one JSON object per logged step) mirrored to W&B.

W&B never decides whether a run lives: mode `auto` is offline without an API key or network,
`WANDB_MODE=disabled` turns it off, and every W&B exception is caught and reported once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from xtalgen.schema import WandbConfig

log = logging.getLogger("xtalgen.train")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 1.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(cfg: WandbConfig) -> str:
    """online | offline | disabled, from the config, the environment and the network."""
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if not cfg.enabled or cfg.mode == "disabled" or env_mode == "disabled":
        return "disabled"
    if cfg.mode in ("online", "offline"):
        return cfg.mode
    if env_mode in ("online", "offline"):
        return env_mode
    return "online" if _has_wandb_key() and _reachable() else "offline"


class MetricsLogger:
    """Writes metrics.jsonl and W&B on the main rank; every method is a no-op elsewhere."""

    def __init__(self, run_dir: Path, active: bool, wandb_cfg: WandbConfig, run_config: dict,
                 run_name: str, wandb_id: str | None = None):
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "events.jsonl"
        self.wandb_run = None
        self.wandb_mode = "disabled"
        if active:
            self.wandb_mode = resolve_wandb_mode(wandb_cfg)
            if self.wandb_mode != "disabled":
                self._start_wandb(run_dir, wandb_cfg, run_config, run_name, wandb_id)

    # --- metrics.jsonl -----------------------------------------------------------------------
    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, so the file matches an unbroken run."""
        if not self.active or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._wandb_call("log", {k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def log_extra(self, values: dict[str, Any], step: int) -> None:
        """W&B only (e.g. periodic-sampling metrics); lists of row dicts become W&B tables."""
        if self.wandb_run is None:
            return
        payload = {}
        for key, value in values.items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                try:
                    import wandb

                    columns = sorted({c for row in value for c in row})
                    payload[key] = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in value])
                except Exception as exc:
                    log.warning("W&B table %s not logged (%s: %s)", key, type(exc).__name__, exc)
            elif isinstance(value, (int, float, str, bool)):
                payload[key] = value
        self._wandb_call("log", payload, step=step)

    def event(self, record: dict[str, Any]) -> None:
        """A rare event (non-finite loss, preemption) worth keeping; any rank may call this."""
        with self.events_path.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.active:
            return
        if self.wandb_run is not None:
            for key, value in summary.items():
                if isinstance(value, (int, float, str)):
                    self._wandb_call("summary_set", key, value)
            self._wandb_call("finish")
            self.wandb_run = None

    # --- W&B ---------------------------------------------------------------------------------
    def _start_wandb(self, run_dir: Path, cfg: WandbConfig, run_config: dict, name: str,
                     wandb_id: str | None) -> None:
        try:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=name,
                id=wandb_id,
                resume="allow" if wandb_id else None,
                dir=str(run_dir),
                config=run_config,
                mode=self.wandb_mode,
                settings=wandb.Settings(console="off"),  # system stats stay on (the default)
            )
        except Exception as exc:  # a broken W&B must never stop training
            log.warning("W&B disabled: could not start a run (%s: %s)", type(exc).__name__, exc)
            self.wandb_run, self.wandb_mode = None, "disabled"

    @property
    def wandb_id(self) -> str | None:
        return getattr(self.wandb_run, "id", None)

    def _wandb_call(self, what: str, *args, **kwargs) -> None:
        if self.wandb_run is None:
            return
        try:
            if what == "log":
                self.wandb_run.log(*args, **kwargs)
            elif what == "summary_set":
                self.wandb_run.summary[args[0]] = args[1]
            elif what == "finish":
                self.wandb_run.finish()
        except Exception as exc:
            log.warning("W&B disabled after an error in %s (%s: %s)", what, type(exc).__name__, exc)
            self.wandb_run, self.wandb_mode = None, "disabled"
