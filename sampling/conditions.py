"""Sampling conditions: parse requests against a model's conditions, draw targets, build tensors.

A model knows the properties it was trained on (`ModelConfig.conditions`); a request may set any
subset of them, each to a value or, for a scalar property, to a range:

    dft_band_gap=3.0          every structure gets the target 3.0
    dft_band_gap>=3           a lower bound       (also <= for an upper bound)
    ml_bulk_modulus=100..200  both bounds

A range is sampled by giving each structure its own point target, drawn from the distribution of
the property in the model's fine-tuning data restricted to the range (`stats["property_quantiles"]`,
its 1,001 quantiles, written by `xtalgen finetune`). The model is only ever asked for values it saw
in training, in the proportions it saw them, which is what "a band gap of at least 3 eV, as such
materials come" means; a fixed point such as the range's middle would ask for one value only, and
for an open bound there is no middle. A range that holds no training value is refused.
Values keep their meaning in the output metadata (`3.0`, `"Co-Li-O"`, `225`) and become the
tensors the score network reads (`xtalgen.property_encoding`) only at the last moment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xtalgen.property_encoding import canonical_chemical_system, chemical_system_multi_hot
from xtalgen.schema import ConditionConfig, ConfigError

QUANTILES_KEY = "property_quantiles"  # stats[QUANTILES_KEY][name]: 1,001 quantiles of the property


@dataclass(frozen=True)
class Range:
    """A scalar target range; None is an open end."""

    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict:
        return {"min": self.low, "max": self.high}

    def __str__(self) -> str:
        if self.high is None:
            return f">={self.low:g}"
        if self.low is None:
            return f"<={self.high:g}"
        return f"{self.low:g}..{self.high:g}"


ConditionValue = float | int | str
ConditionRequest = ConditionValue | Range

_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|=)\s*(.*?)\s*$")


def split_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["dft_band_gap>=3", "chemical_system=Li-Co-O"]` -> {"dft_band_gap": ">=3", "chemical_system":
    "Li-Co-O"}: names to raw requests (a bound keeps its operator)."""
    parsed: dict[str, str] = {}
    for item in items:
        match = _ASSIGNMENT.match(item)
        if not match or not match.group(3):
            raise ConfigError(f"condition {item!r} is not of the form name=value, name>=value, name<=value "
                              "or name=low..high")
        name, operator, value = match.groups()
        if name in parsed:
            raise ConfigError(f"condition {name!r} given twice")
        parsed[name] = value if operator == "=" else operator + value
    return parsed


def parse_conditions(
    raw: Mapping[str, object], available: Sequence[ConditionConfig]
) -> dict[str, ConditionRequest]:
    """Check names against the model's conditions and convert each request to its kind."""
    by_name = {c.name: c for c in available}
    parsed: dict[str, ConditionRequest] = {}
    for name, value in raw.items():
        if not by_name:
            raise ConfigError(f"condition {name!r}: this model is unconditional and takes no conditions; "
                              "fine-tune it on the property first (`xtalgen finetune`)")
        if name not in by_name:
            known = ", ".join(sorted(by_name))
            raise ConfigError(f"unknown condition {name!r}; this model was trained on: {known}")
        parsed[name] = _parse_value(by_name[name], value)
    return parsed


def _parse_value(cond: ConditionConfig, value: object) -> ConditionRequest:
    text = str(value).strip()
    try:
        if cond.kind == "scalar":
            return _parse_scalar(text)
        if _is_range(text):
            raise ValueError("ranges apply to scalar properties only")
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
            return canonical_chemical_system(text)
    except ValueError as exc:
        raise ConfigError(f"condition {cond.name!r} ({cond.kind}): bad value {text!r}: {exc}") from None
    raise ConfigError(f"condition {cond.name!r} has unknown kind {cond.kind!r}")


def _is_range(text: str) -> bool:
    return text.startswith((">=", "<=")) or ".." in text


def _finite(text: str) -> float:
    number = float(text)
    if not np.isfinite(number):
        raise ValueError("not finite")
    return number


def _parse_scalar(text: str) -> ConditionRequest:
    if text.startswith(">="):
        return Range(low=_finite(text[2:]))
    if text.startswith("<="):
        return Range(high=_finite(text[2:]))
    if ".." in text:
        low, high = (_finite(part) for part in text.split("..", 1))
        if not low <= high:
            raise ValueError(f"the range's low end {low:g} is above its high end {high:g}")
        return Range(low, high)
    return _finite(text)


def request_to_json(conditions: Mapping[str, ConditionRequest]) -> dict:
    """Requests as JSON values (a range as {"min", "max"}), for the request record and metadata."""
    return {k: v.to_json() if isinstance(v, Range) else v for k, v in conditions.items()}


def check_ranges_samplable(conditions: Mapping[str, ConditionRequest], stats: Mapping) -> None:
    """Refuse, before any sampling, a range the model has no distribution for or that holds no
    training value."""
    for name, request in conditions.items():
        if isinstance(request, Range):
            _values_in_range(name, request, stats)


def _values_in_range(name: str, request: Range, stats: Mapping) -> np.ndarray:
    quantiles = (stats.get(QUANTILES_KEY) or {}).get(name)
    if not quantiles:
        raise ConfigError(f"condition {name!r}: a range needs the property's distribution in the model, "
                          "which `xtalgen finetune` stores; this model has none (give a value instead)")
    table = np.asarray(quantiles, dtype=np.float64)
    low = -np.inf if request.low is None else request.low
    high = np.inf if request.high is None else request.high
    inside = table[(table >= low) & (table <= high)]
    if inside.size == 0:
        raise ConfigError(f"condition {name}{request}: no training structure lies in that range (the "
                          f"fine-tuning data span {table[0]:g}..{table[-1]:g})")
    return inside


def draw_targets(
    conditions: Mapping[str, ConditionRequest], stats: Mapping, count: int, generator: torch.Generator
) -> dict[str, list[ConditionValue]]:
    """Per-structure point targets: a value repeated, a range drawn (module docstring). Draws come
    from `generator` (one per batch of the sampling plan), so a resumed or re-ranked run draws the
    same targets."""
    targets: dict[str, list[ConditionValue]] = {}
    for name in sorted(conditions):
        request = conditions[name]
        if isinstance(request, Range):
            inside = _values_in_range(name, request, stats)
            picks = torch.randint(len(inside), (count,), generator=generator).tolist()
            targets[name] = [float(inside[i]) for i in picks]
        else:
            targets[name] = [request] * count
    return targets


def condition_tensors(
    targets: Mapping[str, Sequence[ConditionValue]],
    available: Sequence[ConditionConfig],
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Per-structure targets -> tensors: scalars (B,) float, classes (B,) long, chemical systems
    (B, 100) float multi-hot."""
    kinds = {c.name: c.kind for c in available}
    tensors = {}
    for name, values in targets.items():
        kind = kinds[name]
        if kind == "scalar":
            tensors[name] = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
        elif kind in ("categorical", "space_group"):
            tensors[name] = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
        else:
            hot = np.stack([chemical_system_multi_hot(str(v)) for v in values])
            tensors[name] = torch.from_numpy(hot).to(device=device, dtype=torch.float32)
    return tensors
