"""Pure-PyTorch stand-in for the few `torch_scatter` functions that MatterGen 1.0.3 imports.

Why this exists: the compiled `torch_scatter` extension publishes no wheels for torch 2.13, and the
MatterGen baseline in this folder runs on that torch (the only one installed on the benchmark
machines). Every function here reproduces torch_scatter's semantics for the arguments MatterGen
(and torch_geometric's optional fast paths) pass, using `Tensor.scatter_reduce_`, which since torch
2.0 runs the same kind of fused scatter kernel. This is benchmark scaffolding, not part of xtalgen.
"""

from __future__ import annotations

import torch
from torch import Tensor

__version__ = "2.1.2+xtalgen.shim"

_TORCH_REDUCE = {"sum": "sum", "add": "sum", "mean": "mean", "mul": "prod", "max": "amax", "min": "amin"}


def broadcast(index: Tensor, src: Tensor, dim: int) -> Tensor:
    """Expand a 1-D `index` (or one of lower rank) to `src`'s shape along `dim`, as torch_scatter does."""
    dim = dim + src.dim() if dim < 0 else dim
    if index.dim() == 1:
        index = index.view((1,) * dim + (-1,) + (1,) * (src.dim() - dim - 1))
    while index.dim() < src.dim():
        index = index.unsqueeze(-1)
    return index.expand_as(src)


def scatter(
    src: Tensor,
    index: Tensor,
    dim: int = -1,
    out: Tensor | None = None,
    dim_size: int | None = None,
    reduce: str = "sum",
) -> Tensor:
    """Reduce `src` into `dim_size` slots along `dim` (empty slots are 0, like torch_scatter)."""
    if reduce not in _TORCH_REDUCE:
        raise ValueError(f"unsupported reduce {reduce!r}")
    dim = dim + src.dim() if dim < 0 else dim
    index = broadcast(index, src, dim)
    if out is None:
        size = list(src.shape)
        if dim_size is None:
            dim_size = int(index.max()) + 1 if index.numel() > 0 else 0
        size[dim] = int(dim_size)
        out = src.new_ones(size) if reduce == "mul" else src.new_zeros(size)
        include_self = reduce in ("sum", "add", "mul")
    else:
        include_self = True
    if reduce in ("sum", "add"):
        return out.scatter_add_(dim, index, src)
    return out.scatter_reduce_(dim, index, src, reduce=_TORCH_REDUCE[reduce], include_self=include_self)


def scatter_add(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="sum")


def scatter_sum(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="sum")


def scatter_mean(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="mean")


def scatter_mul(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim, out, dim_size, reduce="mul")


def _scatter_arg(src: Tensor, index: Tensor, dim: int, dim_size: int | None, reduce: str):
    """(values, argument) like torch_scatter.scatter_max/min; empty slots get arg = src.size(dim)."""
    dim = dim + src.dim() if dim < 0 else dim
    values = scatter(src, index, dim, dim_size=dim_size, reduce=reduce)
    full_index = broadcast(index, src, dim)
    position = torch.arange(src.size(dim), device=src.device)
    position = broadcast(position, src, dim)
    is_extreme = src == values.gather(dim, full_index)
    candidate = torch.where(is_extreme, position, torch.full_like(position, src.size(dim)))
    arg = torch.full(values.shape, src.size(dim), dtype=torch.long, device=src.device)
    arg.scatter_reduce_(dim, full_index, candidate, reduce="amin", include_self=True)
    return values, arg


def scatter_max(src, index, dim=-1, out=None, dim_size=None):
    return _scatter_arg(src, index, dim, dim_size, "max")


def scatter_min(src, index, dim=-1, out=None, dim_size=None):
    return _scatter_arg(src, index, dim, dim_size, "min")


def segment_coo(src: Tensor, index: Tensor, out=None, dim_size=None, reduce: str = "sum") -> Tensor:
    """Reduce over a sorted `index`; the same result as `scatter` along the index's last dim."""
    return scatter(src, index, index.dim() - 1, out, dim_size, reduce)


def segment_csr(src: Tensor, indptr: Tensor, out=None, reduce: str = "sum") -> Tensor:
    """Reduce `src` over the segments [indptr[i], indptr[i+1]) along dim indptr.dim()-1."""
    dim = indptr.dim() - 1
    if indptr.dim() > 1:
        if not all(s == 1 for s in indptr.shape[:-1]):
            raise NotImplementedError("batched indptr is not needed by MatterGen")
        indptr = indptr.reshape(-1)
    counts = indptr[1:] - indptr[:-1]
    start = int(indptr[0])
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=src.device), counts)
    window = src.narrow(dim, start, int(indptr[-1]) - start)
    return scatter(window, segment, dim, out, dim_size=counts.numel(), reduce=reduce)


def gather_csr(src: Tensor, indptr: Tensor, out=None) -> Tensor:
    counts = indptr[1:] - indptr[:-1]
    return src.repeat_interleave(counts, dim=indptr.dim() - 1)
