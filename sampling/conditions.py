"""Sampling conditions: parse `name=value` requests against a model's conditions, build tensors.

A model knows the properties it was trained on (`ModelConfig.conditions`); a request may set any
subset of them. Values keep their meaning in the output metadata (`3.0`, `"Li-Co-O"`, `225`) and are
turned into the tensors the score network reads only at the last moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from xtalgen.record import MAX_ATOMIC_NUMBER
from xtalgen.schema import ConditionConfig, ConfigError

ConditionValue = float | int | str


def split_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["dft_band_gap=3.0", "chemical_system=Li-Co-O"]` -> {name: raw value}."""
    parsed: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ConfigError(f"condition {item!r} is not of the form name=value")
        if name in parsed:
            raise ConfigError(f"condition {name!r} given twice")
        parsed[name] = value
    return parsed


def parse_conditions(
    raw: Mapping[str, object], available: Sequence[ConditionConfig]
) -> dict[str, ConditionValue]:
    """Check names against the model's conditions and convert each value to its kind."""
    by_name = {c.name: c for c in available}
    parsed: dict[str, ConditionValue] = {}
    for name, value in raw.items():
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none: this model is unconditional"
            raise ConfigError(f"unknown condition {name!r}; this model knows: {known}")
        parsed[name] = _parse_value(by_name[name], value)
    return parsed


def _parse_value(cond: ConditionConfig, value: object) -> ConditionValue:
    text = str(value).strip()
    try:
        if cond.kind == "scalar":
            number = float(text)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError("not finite")
            return number
        if cond.kind == "categorical":
            code = int(text)
            if not 0 <= code < cond.num_classes:
                raise ValueError(f"class outside 0..{cond.num_classes - 1}")
            return code
        if cond.kind == "space_group":
            number = int(text)
            if not 1 <= number <= 230:
                raise ValueError("space groups are numbered 1..230")
            return number
        if cond.kind == "chemical_system":
            return _canonical_chemical_system(text)
    except ValueError as exc:
        raise ConfigError(f"condition {cond.name!r} ({cond.kind}): bad value {text!r}: {exc}") from None
    raise ConfigError(f"condition {cond.name!r} has unknown kind {cond.kind!r}")


def _canonical_chemical_system(text: str) -> str:
    """`"O-Li-Co"` -> `"Co-Li-O"` (sorted symbols, pymatgen's chemical-system convention)."""
    from pymatgen.core import Element

    symbols = [s.strip() for s in text.replace(",", "-").split("-") if s.strip()]
    if not symbols:
        raise ValueError("no elements")
    elements = set()
    for symbol in symbols:
        if not Element.is_valid_symbol(symbol):
            raise ValueError(f"{symbol!r} is not an element symbol")
        if Element(symbol).Z > MAX_ATOMIC_NUMBER:
            raise ValueError(f"{symbol} is beyond Z={MAX_ATOMIC_NUMBER}")
        elements.add(symbol)
    return "-".join(sorted(elements))


def chemical_system_multi_hot(system: str) -> torch.Tensor:
    """(100,) float multi-hot over Z = 1..100 (column Z-1), the score network's encoding."""
    from pymatgen.core import Element

    hot = torch.zeros(MAX_ATOMIC_NUMBER)
    for symbol in system.split("-"):
        hot[Element(symbol).Z - 1] = 1.0
    return hot


def condition_tensors(
    values: Mapping[str, ConditionValue],
    available: Sequence[ConditionConfig],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """One request's values repeated over a batch: scalars (B,) float, classes (B,) long,
    chemical systems (B, 100) float multi-hot."""
    kinds = {c.name: c.kind for c in available}
    tensors = {}
    for name, value in values.items():
        kind = kinds[name]
        if kind == "scalar":
            tensors[name] = torch.full((batch_size,), float(value), device=device)
        elif kind in ("categorical", "space_group"):
            tensors[name] = torch.full((batch_size,), int(value), dtype=torch.long, device=device)
        else:
            tensors[name] = chemical_system_multi_hot(str(value)).to(device).expand(batch_size, -1).clone()
    return tensors
