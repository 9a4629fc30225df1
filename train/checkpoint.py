"""Checkpoints: DeepSpeed's own files plus one small weights-only file of trainer state per rank.

Layout of a run directory's `checkpoints/`:

    latest                     tag of the newest complete checkpoint (written by DeepSpeed last)
    step_00000500/             DeepSpeed model/optimizer files (ZeRO partitions per rank) and
      trainer_rank000.pt       per-rank state: step, epoch, RNG states, loader position, EMA
      ...                      (partition), LR schedule, loss average

The per-rank file holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`. DeepSpeed's `client_state` carries the step for its own records.
A checkpoint is only complete once `latest` names it, so a run killed while saving resumes from the
previous one.

`CheckpointManager` writes and reads all of it: every component of a run (loader, EMA, LR schedule,
loss average, RNG, the trainer's counters) saves itself (`state_dict`/`load_state_dict`), and the
manager gathers them into the per-rank file and restores them on resume. Its format,
`xtalgen-trainer-state-v1`:

    {"format": ..., "rank": r, "world_size": n,
     "step": ..., "epoch": ..., ...,             the counters, at the top level (consolidation reads `step`)
     "loader": {...}, "ema": {...}, "schedule": {...}, "loss_average": {...}, "rng": {...}}
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
LATEST_FILE = "latest"
STATE_FORMAT = "xtalgen-trainer-state-v1"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_path(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir / f"trainer_rank{rank:03d}.pt"


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states, as weights-only-loadable objects."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(checkpoint_dir: Path, rank: int, state: dict) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = rank_state_path(checkpoint_dir, rank)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file


def load_rank_state(checkpoint_dir: Path, rank: int) -> dict:
    path = rank_state_path(checkpoint_dir, rank)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no trainer state for rank {rank} ({path.name})")
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_world_size(checkpoint_dir: Path) -> int:
    return len(list(checkpoint_dir.glob("trainer_rank*.pt")))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    tagged = [p for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
    return sorted((p for p in tagged if rank_state_path(p, 0).exists()), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint `latest` names (DeepSpeed writes it after every rank saved), else None."""
    latest = root / LATEST_FILE
    if not latest.exists():
        return None
    candidate = root / latest.read_text().strip()
    return candidate if rank_state_path(candidate, 0).exists() else None


def resolve_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """`none` -> None; `auto` -> latest in this run (None if fresh); a path -> that checkpoint."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(resume)
    for candidate in (path, path / "checkpoints"):
        if rank_state_path(candidate, 0).exists():
            return candidate
        if (candidate / LATEST_FILE).exists() and latest_checkpoint(candidate):
            return latest_checkpoint(candidate)
    raise FileNotFoundError(f"config key 'train.resume': no checkpoint found at {resume!r}")


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names)."""
    protected = latest_checkpoint(root)
    removed = []
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if protected is not None and old.resolve() == protected.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Counters(Stateful, Protocol):
    step: int
    epoch: int


class RNGState:
    """Python's, numpy's and torch's global generators, as one checkpointed component."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


class CheckpointManager:
    """Save and restore a run: DeepSpeed's engine files plus one trainer-state file per rank.

    `counters` (step, epoch, ...) go to the top level of the per-rank file, each of `components`
    under its name. On resume the engine is restored first, then the counters, then the components
    in the order given: put the RNG last, so nothing drawn while restoring moves the stream.
    """

    def __init__(self, root: Path, engine, counters: Counters, components: dict[str, Stateful], *,
                 rank: int, world_size: int, keep: int):
        self.root, self.engine, self.counters = Path(root), engine, counters
        self.components = dict(components)
        self.rank, self.world_size, self.keep = rank, world_size, keep

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size,
                **self.counters.state_dict(),
                **{name: component.state_dict() for name, component in self.components.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.counters.load_state_dict(state)
        for name, component in self.components.items():
            component.load_state_dict(state[name])

    def save(self) -> Path:
        """Write this rank's state and DeepSpeed's files for the current step; prune old ones."""
        from xtalgen.train.distributed import barrier
        from xtalgen.train.parallelize import save_engine_checkpoint

        tag = tag_for_step(self.counters.step)
        directory = self.root / tag
        save_rank_state(directory, self.rank, self.state_dict())
        barrier()  # every rank's state is on disk before DeepSpeed writes `latest`
        save_engine_checkpoint(self.engine, self.root, tag,
                               client_state={"step": self.counters.step, "epoch": self.counters.epoch,
                                             "world_size": self.world_size})
        barrier()
        if self.rank == 0:
            prune_checkpoints(self.root, self.keep)
        return directory

    def load(self, source: Path) -> None:
        """Restore the engine and every component from checkpoint `source` (same number of ranks)."""
        from xtalgen.schema import ConfigError
        from xtalgen.train.parallelize import load_engine_checkpoint

        saved_world = saved_world_size(source)
        if saved_world != self.world_size:
            raise ConfigError(
                f"config key 'train.resume': {source} was written by {saved_world} ranks but this run "
                f"has {self.world_size}; exact resume needs the same number of ranks. Consolidate it "
                "(`xtalgen train consolidate`) and start a new run from those weights instead"
            )
        load_engine_checkpoint(self.engine, source)
        self.load_state_dict(load_rank_state(source, self.rank))
