"""Run logging on rank 0: `metrics.jsonl` (one JSON object per logged step) mirrored to W&B; and
`LossAverage`, the smoothed global loss that the plateau schedule watches (a checkpointed component).

W&B never decides whether a run lives: mode `auto` is offline without an API key or network,
`WANDB_MODE=disabled` turns it off, and every W&B exception is caught and reported once.

An online run that cannot start within `train.wandb.init_timeout_s` (a server that does not
answer, a proxy that swallows the connection, an error) is started again offline, with the same
run id, so its files are kept on disk and `wandb sync` uploads them later; one log line says so
and gives the command. Offline, not disabled: a disabled run leaves nothing to sync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import string
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from xtalgen.schema import WandbConfig

log = logging.getLogger("xtalgen.train")


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        text = netrc.read_text()
    except OSError:
        return False
    return any(host in text for host in {"api.wandb.ai", urlsplit(_base_url()).hostname or "api.wandb.ai"})


def _base_url() -> str:
    """The W&B server this process talks to: WANDB_BASE_URL (a self-hosted one), else the installed
    wandb's default (api.wandb.ai in older releases, api.forge.coreweave.com in 0.31)."""
    url = os.environ.get("WANDB_BASE_URL", "").strip()
    if url:
        return url
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:
        return "https://api.wandb.ai"


def _reachable(url: str | None = None, timeout: float = 1.5) -> bool:
    """Whether the server's port accepts a TCP connection: a quick check that catches no network
    and refused ports; a server that accepts but never answers is caught by the init timeout."""
    parts = urlsplit(url or _base_url())
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:  # a malformed port: leave the verdict to wandb.init
        return True
    try:
        with socket.create_connection((parts.hostname or "api.wandb.ai", port), timeout=timeout):
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


def _offline_because(cfg: WandbConfig, mode: str) -> str | None:
    """Why mode `auto` chose offline although an API key is there (None if it was not that)."""
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode != "offline" or cfg.mode != "auto" or env_mode in ("online", "offline") or not _has_wandb_key():
        return None
    return f"{_base_url()} unreachable"


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
                self._start_wandb(run_dir, wandb_cfg, run_config, run_name, wandb_id,
                                  _offline_because(wandb_cfg, self.wandb_mode))

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
                     wandb_id: str | None, offline_because: str | None = None) -> None:
        try:
            import wandb

            # The id is chosen here so that an offline restart continues the run the online attempt began.
            run_id = wandb_id or _new_run_id()
            arguments = dict(project=cfg.project, entity=cfg.entity or None, name=name, id=run_id,
                             resume="allow" if wandb_id else None, dir=str(run_dir), config=run_config)
            if self.wandb_mode == "online":
                started = time.monotonic()
                try:
                    self.wandb_run = _init_online(wandb, arguments, cfg.init_timeout_s)
                    return
                except Exception as exc:  # no answer in time, refused, rejected: offline instead
                    offline_because = (f"no online run after {time.monotonic() - started:.0f} s "
                                       f"({type(exc).__name__}: {_first_line(exc)})")
                # The failed attempt's stream holds the run id until W&B's service is torn down.
                with contextlib.suppress(Exception):
                    wandb.teardown()
                self.wandb_mode = "offline"
            self.wandb_run = wandb.init(**arguments, mode="offline", settings=wandb.Settings(console="off"))
        except Exception as exc:  # a broken W&B must never stop training
            log.warning("W&B disabled: could not start a run (%s: %s)", type(exc).__name__, exc)
            self.wandb_run, self.wandb_mode = None, "disabled"
            return
        if offline_because:
            where = getattr(self.wandb_run.settings, "sync_dir", None) or str(run_dir / "wandb")
            log.warning("W&B offline: %s; the run is kept in %s, upload it with `wandb sync %s`",
                        offline_because, where, where)

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


def _init_online(wandb, arguments: dict, timeout_s: float):
    """wandb.init online, giving up after about `timeout_s` seconds."""
    # Before the run, W&B looks up the account behind the key for its "logged in as" message; with
    # no answer from the server that lookup waits ~10 s of its own, outside init_timeout. The
    # lookup only feeds messages and account defaults, so it is skipped (process-wide setting).
    if "x_disable_viewer" in getattr(wandb.Settings, "model_fields", {}):
        with contextlib.suppress(Exception):
            wandb.setup(wandb.Settings(x_disable_viewer=True))
    return wandb.init(**arguments, mode="online", settings=wandb.Settings(console="off", init_timeout=timeout_s))


def _new_run_id() -> str:
    """A W&B run id of the form W&B makes: 8 lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class LossAverage:
    """Bias-corrected exponential moving average of the global train loss (what plateau watches)."""

    def __init__(self, beta: float = 0.98):
        self.beta, self.value_raw, self.count = beta, 0.0, 0

    def update(self, value: float) -> None:
        self.count += 1
        self.value_raw = self.beta * self.value_raw + (1 - self.beta) * value

    @property
    def value(self) -> float:
        return self.value_raw / (1 - self.beta**self.count) if self.count else float("nan")

    def state_dict(self) -> dict:
        return {"beta": self.beta, "value_raw": self.value_raw, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.value_raw, self.count = state["beta"], state["value_raw"], state["count"]
