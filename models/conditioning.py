"""Property embeddings for conditional generation and classifier-free guidance.

Each conditioned property gets one embedding module mapping its per-structure value to a (B, H)
vector, chosen by kind:

* scalar           sinusoidal features of the standardised value, then an MLP
* categorical      a table of `num_classes` rows (class codes 0..num_classes-1)
* chemical_system  a (B, 100) multi-hot over elements Z=1..100 (column Z-1), then an MLP
* space_group      a table of 230 rows (space-group numbers 1..230)

Every embedding owns a learned null token, used where the property is absent (`mask` False). In
training mode, condition dropout replaces present values by the null token with probability p,
which trains the unconditional model at the same time (classifier-free guidance). Several
properties combine by summation.

Ranges and inequalities ("band gap >= 3 eV") fit this design without changing its interface: a
property becomes two bound slots, lower and upper, each its own embedding of the same kind with its
own null token ("no bound"); an equality target fills both with the same value, "x >= 3" fills only
the lower one. Training then draws random bounds around each structure's true value. Because
absent slots are already null tokens, a model trained on point targets loads unchanged (the new
slot's parameters are simply added).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from xtalgen.models.layers import mlp, sinusoidal_features
from xtalgen.schema.model import ConditionConfig

NUM_ELEMENTS = 100
NUM_SPACE_GROUPS = 230
KINDS = ("scalar", "categorical", "chemical_system", "space_group")


class ScalarEmbedding(nn.Module):
    """Float value -> (B, H). `mean`/`std` buffers standardise the value (set them from data)."""

    def __init__(self, hidden: int, num_features: int = 64):
        super().__init__()
        self.num_features = num_features
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))
        self.net = mlp(num_features, hidden, hidden)

    def set_normalization(self, mean: float, std: float) -> None:
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean.fill_(mean)
        self.std.fill_(std)

    def forward(self, value: Tensor) -> Tensor:
        dtype = self.net[0].weight.dtype
        work = torch.promote_types(dtype, torch.float32)  # features never in bf16
        z = (value.to(work) - self.mean.to(work)) / self.std.to(work)  # (B,)
        # Wavelengths 0.01..100 standard deviations: fine resolution near the data and no aliasing
        # over any realistic range of targets.
        return self.net(sinusoidal_features(z, self.num_features, 1e-2, 1e2).to(dtype))


class TableEmbedding(nn.Module):
    """Integer code in [first, first + size) -> (B, H)."""

    def __init__(self, hidden: int, size: int, first: int = 0, name: str = ""):
        super().__init__()
        self.first, self.size, self.name = first, size, name
        self.table = nn.Embedding(size, hidden)

    def forward(self, value: Tensor) -> Tensor:
        index = value.long() - self.first
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            raise ValueError(
                f"condition {self.name!r}: values must lie in [{self.first}, {self.first + self.size - 1}]"
            )
        return self.table(index)


class ChemicalSystemEmbedding(nn.Module):
    """(B, 100) multi-hot over elements -> (B, H)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = mlp(NUM_ELEMENTS, hidden, hidden)

    def forward(self, value: Tensor) -> Tensor:
        if value.ndim != 2 or value.shape[1] != NUM_ELEMENTS:
            raise ValueError(f"chemical_system must be a (B, {NUM_ELEMENTS}) multi-hot, got {tuple(value.shape)}")
        return self.net(value.to(self.net[0].weight.dtype))


def build_property_embedding(cond: ConditionConfig, hidden: int) -> nn.Module:
    if cond.kind == "scalar":
        return ScalarEmbedding(hidden)
    if cond.kind == "categorical":
        if cond.num_classes <= 0:
            raise ValueError(f"categorical condition {cond.name!r} needs num_classes > 0")
        return TableEmbedding(hidden, cond.num_classes, first=0, name=cond.name)
    if cond.kind == "chemical_system":
        return ChemicalSystemEmbedding(hidden)
    if cond.kind == "space_group":
        return TableEmbedding(hidden, NUM_SPACE_GROUPS, first=1, name=cond.name)
    raise ValueError(f"condition {cond.name!r}: unknown kind {cond.kind!r}; expected one of {KINDS}")


class ConditionEmbedding(nn.Module):
    """Sum of the embeddings of all conditioned properties, (B, H); null tokens where absent."""

    def __init__(self, conditions: Sequence[ConditionConfig], hidden: int, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"condition dropout must be in [0, 1], got {dropout}")
        names = [c.name for c in conditions]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise ValueError(f"condition names must be non-empty and unique, got {names}")
        self.names = names
        self.dropout = dropout
        self.embeddings = nn.ModuleDict({c.name: build_property_embedding(c, hidden) for c in conditions})
        self.null_tokens = nn.ParameterDict({n: nn.Parameter(0.02 * torch.randn(hidden)) for n in names})

    def set_normalization(self, name: str, mean: float, std: float) -> None:
        """Standardise scalar property `name` as (x - mean) / std (e.g. from the shard manifest).

        Stored in buffers, so saved models carry it and sampling sees the same embedding."""
        embedding = self.embeddings[name] if name in self.embeddings else None
        if not isinstance(embedding, ScalarEmbedding):
            raise ValueError(f"{name!r} is not a configured scalar condition")
        embedding.set_normalization(mean, std)

    def forward(
        self,
        batch_size: int,
        conditions: Mapping[str, Tensor] | None = None,
        condition_mask: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        return self.embed(batch_size, conditions, condition_mask)[0]

    def embed(
        self,
        batch_size: int,
        conditions: Mapping[str, Tensor] | None = None,
        condition_mask: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, H) summed embedding, and per property the (B,) bool rows that used their value.

        The second part tells a consumer of the raw value (the element-set term of the score network)
        which rows were given the null token, by absence or by condition dropout."""
        conditions = conditions or {}
        condition_mask = condition_mask or {}
        unknown = set(conditions) - set(self.names)
        if unknown:
            raise ValueError(f"conditions {sorted(unknown)} are not configured; known: {self.names}")
        total, used = None, {}
        for name in self.names:
            emb, used[name] = self._embed_one(name, batch_size, conditions.get(name), condition_mask.get(name))
            total = emb if total is None else total + emb
        return total, used

    def _embed_one(self, name, batch_size, value, mask) -> tuple[Tensor, Tensor]:
        null = self.null_tokens[name].expand(batch_size, -1)  # (B, H)
        if value is None:
            return null, torch.zeros(batch_size, dtype=torch.bool, device=null.device)
        device = null.device
        present = torch.ones(batch_size, dtype=torch.bool, device=device) if mask is None else mask.bool()
        if self.training and self.dropout > 0:
            # Drawn from torch's global RNG so that a checkpointed RNG state resumes exactly.
            keep = torch.rand(batch_size, device=device) >= self.dropout
            present = present & keep
        # Absent rows may hold anything (NaN, 0 for a space group); give them a valid placeholder.
        embedding = self.embeddings[name]
        placeholder = torch.full_like(value, getattr(embedding, "first", 0))
        row_present = present.view(-1, *([1] * (value.ndim - 1)))
        emb = embedding(torch.where(row_present, value, placeholder))  # (B, H)
        return torch.where(present[:, None], emb, null), present
