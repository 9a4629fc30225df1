"""Exponential moving average of the weights, kept in fp32, working with every ZeRO stage.

With ZeRO 0-2 every rank holds whole parameters, so the average is of whole tensors (identical on
all ranks). With ZeRO-3 a rank holds only its flat partition of each parameter (what
`parallelize.local_tensor` returns), so the average is of that partition; `gather_partitions`
rebuilds whole tensors from all ranks' partitions offline (DeepSpeed pads the flattened parameter
to world x partition size and gives rank r the r-th slice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from xtalgen.train.parallelize import full_shape, is_partitioned, local_tensor


class ExponentialMovingAverage:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.names: list[str] = []
        self.shadow: list[torch.Tensor] = []
        self.shapes: dict[str, list[int]] = {}  # whole shapes, for rebuilding ZeRO-3 partitions
        self.partitioned = False
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            self.names.append(name)
            self.shadow.append(local_tensor(param).detach().float().clone())
            self.partitioned |= is_partitioned(param)
            self.shapes[name] = list(full_shape(param))
        self._params = dict(module.named_parameters())

    def _current(self) -> list[torch.Tensor]:
        # Looked up every time: ZeRO may swap a parameter's storage object between steps.
        return [local_tensor(self._params[name]) for name in self.names]

    @torch.no_grad()
    def update(self) -> None:
        current = [t.float() for t in self._current()]
        # shadow <- decay * shadow + (1 - decay) * current, in one fused op over all tensors.
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the module (e.g. for periodic sampling)."""
        current = self._current()
        backup = [t.clone() for t in current]
        for target, average in zip(current, self.shadow):
            target.copy_(average.to(target.dtype))
        try:
            yield
        finally:
            for target, saved in zip(current, backup):
                target.copy_(saved)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "partitioned": self.partitioned,
            "shapes": self.shapes,
            "shadow": dict(zip(self.names, self.shadow)),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["shadow"])
        if missing or bool(state["partitioned"]) != self.partitioned:
            raise ValueError(
                f"EMA state does not match the model (missing {sorted(missing)[:5]}, "
                f"partitioned {state['partitioned']} vs {self.partitioned})"
            )
        for i, name in enumerate(self.names):
            saved = state["shadow"][name]
            if saved.shape != self.shadow[i].shape:
                raise ValueError(f"EMA tensor {name!r}: shape {tuple(saved.shape)} vs {tuple(self.shadow[i].shape)}")
            self.shadow[i].copy_(saved)


def gather_partitions(rank_states: list[dict]) -> dict[str, torch.Tensor]:
    """Whole fp32 EMA tensors from the per-rank EMA states (rank order), for any ZeRO stage."""
    first = rank_states[0]
    if not first["partitioned"]:
        return {name: t.clone() for name, t in first["shadow"].items()}
    whole = {}
    for name, shape in first["shapes"].items():
        flat = torch.cat([state["shadow"][name].reshape(-1) for state in rank_states])
        numel = int(torch.Size(shape).numel())
        whole[name] = flat[:numel].reshape(shape).clone()  # drop DeepSpeed's end padding
    return whole
