"""Fused message passing in Triton: the "triton" backend of `xtalgen.models.graph.message_passing`.

out[t] = sum over edges e = (s -> t) of node_feats[s] * edge_filter[e], with node_feats (N, K_n, C),
edge_filter (E, K_e, C), K_n, K_e in {1, K}, broadcasting over the middle axis, out (num_nodes, K, C).

Why fused: the reference materialises the (E, K, C) messages, zero-fills an (N, K, C) float32
buffer and scatter-adds into it with atomics; its backward gathers and scatters again. Here each
pass reads its operands once and writes its result once, and the middle-axis broadcast is an index
stride of 0 rather than a repeated tensor.

* Forward: a segmented reduction over target-sorted edges (CSR row pointers). One program per
  (target, channel block, k) loops over the target's edges in tiles of BLOCK_E, accumulating in
  float32 (float64 for float64 inputs) in a fixed order: no atomics, so results are bit-for-bit
  reproducible. `radius_graph_pbc` returns edges sorted by target; other orders are checked for
  (one comparison and one host sync per call) and then read through a stable sorting permutation.
* Backward, node_feats: the transposed reduction, the same kernel over source-sorted edges (a
  stable argsort of the sources per backward), summing over K too when K_n = 1 < K.
* Backward, edge_filter: node_feats[s] * grad_out[t] per edge, summed over K when K_e = 1 < K.

Both passes are `torch.library` custom ops (`xtalgen::message_passing` and its two gradients)
with fake implementations, so torch.compile traces them as single opaque nodes. Second derivatives
are not implemented (nothing in the model differentiates through a gradient).

The kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1
was set before this module was imported (which is how the CPU tests check them); the choice is
made once, when the kernels are decorated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# True when the kernels below were built for Triton's interpreter (CPU tensors, for testing).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Tile sizes: a tile is BLOCK_E edges x BLOCK_C channels. Gathered rows are C-contiguous, so a
# channel block is one coalesced read per edge; ~2-4K elements per program keep registers modest.
MAX_BLOCK_C = 128
TILE_ELEMENTS = 2048


@triton.jit
def _segment_reduce_kernel(
    out_ptr, gathered_ptr, edge_ptr, rowptr_ptr, edge_ids_ptr, gather_idx_ptr,
    C, K,
    out_row_stride, out_k_stride,
    gathered_row_stride, gathered_k_stride,
    edge_row_stride, edge_k_stride,
    HAS_PERM: tl.constexpr, REDUCE_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[r, k, c] = sum_{i in row r} gathered[gather_idx[e_i], k, c] * edge[e_i, k, c], e_i = edge_ids[i].

    Grid (rows, cdiv(C, BLOCK_C), K or 1). With REDUCE_K the output has one k and the sum also
    runs over k = 0..K-1. A stride of 0 on the k axis broadcasts an operand with a middle axis of 1.
    """
    row = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    acc = tl.zeros((BLOCK_E, BLOCK_C), dtype=ACC_DTYPE)
    for first in range(start, end, BLOCK_E):
        slots = first + tl.arange(0, BLOCK_E)
        edge_mask = slots < end
        if HAS_PERM:
            edges = tl.load(edge_ids_ptr + slots, mask=edge_mask, other=0)
        else:
            edges = slots
        gathered_rows = tl.load(gather_idx_ptr + edges, mask=edge_mask, other=0)
        mask = edge_mask[:, None] & channel_mask[None, :]
        g_base = gathered_rows.to(tl.int64)[:, None] * gathered_row_stride + channels[None, :]
        e_base = edges.to(tl.int64)[:, None] * edge_row_stride + channels[None, :]
        if REDUCE_K:
            for k in range(K):
                g = tl.load(gathered_ptr + g_base + k * gathered_k_stride, mask=mask, other=0.0)
                w = tl.load(edge_ptr + e_base + k * edge_k_stride, mask=mask, other=0.0)
                acc += g.to(ACC_DTYPE) * w.to(ACC_DTYPE)
        else:
            k = tl.program_id(2)
            g = tl.load(gathered_ptr + g_base + k * gathered_k_stride, mask=mask, other=0.0)
            w = tl.load(edge_ptr + e_base + k * edge_k_stride, mask=mask, other=0.0)
            acc += g.to(ACC_DTYPE) * w.to(ACC_DTYPE)
    total = tl.sum(acc, axis=0)  # (BLOCK_C,) one reduction per program, in a fixed order
    out_k = 0 if REDUCE_K else tl.program_id(2)
    out_offsets = row * out_row_stride + out_k * out_k_stride + channels
    tl.store(out_ptr + out_offsets, total.to(out_ptr.dtype.element_ty), mask=channel_mask)


@triton.jit
def _edge_product_kernel(
    out_ptr, node_ptr, grad_ptr, source_ptr, target_ptr,
    E, C, K,
    out_row_stride, out_k_stride,
    node_row_stride, node_k_stride,
    grad_row_stride, grad_k_stride,
    REDUCE_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[e, k, c] = node[source[e], k, c] * grad[target[e], k, c] (summed over k with REDUCE_K).

    Grid (cdiv(E, BLOCK_E), cdiv(C, BLOCK_C), K or 1).
    """
    edges = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    edge_mask = edges < E
    mask = edge_mask[:, None] & (channels < C)[None, :]
    source = tl.load(source_ptr + edges, mask=edge_mask, other=0).to(tl.int64)
    target = tl.load(target_ptr + edges, mask=edge_mask, other=0).to(tl.int64)
    n_base = source[:, None] * node_row_stride + channels[None, :]
    g_base = target[:, None] * grad_row_stride + channels[None, :]
    out_base = edges.to(tl.int64)[:, None] * out_row_stride + channels[None, :]
    if REDUCE_K:
        acc = tl.zeros((BLOCK_E, BLOCK_C), dtype=ACC_DTYPE)
        for k in range(K):
            a = tl.load(node_ptr + n_base + k * node_k_stride, mask=mask, other=0.0)
            g = tl.load(grad_ptr + g_base + k * grad_k_stride, mask=mask, other=0.0)
            acc += a.to(ACC_DTYPE) * g.to(ACC_DTYPE)
        tl.store(out_ptr + out_base, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        k = tl.program_id(2)
        a = tl.load(node_ptr + n_base + k * node_k_stride, mask=mask, other=0.0)
        g = tl.load(grad_ptr + g_base + k * grad_k_stride, mask=mask, other=0.0)
        product = a.to(ACC_DTYPE) * g.to(ACC_DTYPE)
        tl.store(out_ptr + out_base + k * out_k_stride, product.to(out_ptr.dtype.element_ty), mask=mask)


# -- launch helpers -----------------------------------------------------------------------------


def _blocks(channels: int) -> tuple[int, int]:
    block_c = min(max(triton.next_power_of_2(channels), 16), MAX_BLOCK_C)
    return max(TILE_ELEMENTS // block_c, 16), block_c


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _k_stride(tensor: Tensor, k: int) -> int:
    """Stride of a contiguous (rows, K', C) tensor's middle axis; 0 broadcasts K' = 1 to K."""
    return tensor.shape[2] if tensor.shape[1] == k and k > 1 else 0


def _rowptr(sorted_index: Tensor, rows: int) -> Tensor:
    """CSR row pointers (rows + 1,) of a sorted index: row r owns [rowptr[r], rowptr[r + 1])."""
    bounds = torch.arange(rows + 1, device=sorted_index.device, dtype=sorted_index.dtype)
    return torch.searchsorted(sorted_index, bounds)


def _segment_reduce(out: Tensor, gathered: Tensor, edge: Tensor, index: Tensor, gather_idx: Tensor,
                    presorted: bool) -> Tensor:
    """Fill out (R, K_o, C) with the sums over each row r of the edges e with index[e] = r."""
    rows, k_out, channels = out.shape
    k = max(gathered.shape[1], edge.shape[1])
    if presorted:
        perm, sorted_index = index, index  # perm unused (HAS_PERM=False)
    else:
        perm = torch.argsort(index, stable=True)  # stable: the sum order is the given edge order
        sorted_index = index[perm]
    rowptr = _rowptr(sorted_index, rows)
    block_e, block_c = _blocks(channels)
    reduce_k = k_out == 1 and k > 1
    grid = (rows, triton.cdiv(channels, block_c), 1 if reduce_k else k)
    _segment_reduce_kernel[grid](
        out, gathered, edge, rowptr, perm, gather_idx,
        channels, k,
        out.stride(0), out.stride(1) if k_out > 1 else 0,
        gathered.stride(0), _k_stride(gathered, k),
        edge.stride(0), _k_stride(edge, k),
        HAS_PERM=not presorted, REDUCE_K=reduce_k, ACC_DTYPE=_acc_dtype(out.dtype),
        BLOCK_E=block_e, BLOCK_C=block_c,
    )
    return out


def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if not (t.is_cuda or INTERPRETED):
            raise RuntimeError(
                f"the triton message-passing backend needs a CUDA GPU (got a tensor on {t.device}); "
                "use model.score_net.backend=torch"
            )


# -- custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("xtalgen::message_passing", mutates_args=())
def message_passing_op(node_feats: Tensor, edge_filter: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """node_feats (N, K_n, C), edge_filter (E, K_e, C), both contiguous and of one dtype;
    edge_index (2, E) long [source, target] -> (num_nodes, max(K_n, K_e), C)."""
    _check_device(node_feats, edge_filter, edge_index)
    k = max(node_feats.shape[1], edge_filter.shape[1])
    out = node_feats.new_zeros(num_nodes, k, node_feats.shape[2])
    num_edges = edge_index.shape[1]
    if num_edges == 0 or out.numel() == 0:
        return out
    source, target = edge_index[0], edge_index[1]
    # One host sync: is the target order sorted (radius_graph_pbc's), and are the indices in range?
    # The kernels read memory without bounds checks, so a bad index must be refused here.
    unsorted, src_min, src_max, tgt_min, tgt_max = torch.stack([
        (target[1:] < target[:-1]).any().long(), source.min(), source.max(), target.min(), target.max(),
    ]).tolist()
    if src_min < 0 or src_max >= node_feats.shape[0] or tgt_min < 0 or tgt_max >= num_nodes:
        raise IndexError(
            f"edge_index out of range: sources in [{src_min}, {src_max}] for {node_feats.shape[0]} nodes, "
            f"targets in [{tgt_min}, {tgt_max}] for num_nodes={num_nodes}"
        )
    return _segment_reduce(out, node_feats, edge_filter, target, source, presorted=not unsorted)


@message_passing_op.register_fake
def _(node_feats, edge_filter, edge_index, num_nodes):
    k = max(node_feats.shape[1], edge_filter.shape[1])
    return node_feats.new_empty(num_nodes, k, node_feats.shape[2])


@torch.library.custom_op("xtalgen::message_passing_grad_nodes", mutates_args=())
def grad_nodes_op(grad_out: Tensor, edge_filter: Tensor, edge_index: Tensor, num_sources: int,
                  k_nodes: int) -> Tensor:
    """d out / d node_feats: (num_sources, k_nodes, C) = sum over edges by source of edge_filter * grad_out[t]."""
    _check_device(grad_out, edge_filter, edge_index)
    grad = grad_out.new_zeros(num_sources, k_nodes, grad_out.shape[2])
    if edge_index.shape[1] == 0 or grad.numel() == 0:
        return grad
    source, target = edge_index[0], edge_index[1]
    return _segment_reduce(grad, grad_out, edge_filter, source, target, presorted=False)


@grad_nodes_op.register_fake
def _(grad_out, edge_filter, edge_index, num_sources, k_nodes):
    return grad_out.new_empty(num_sources, k_nodes, grad_out.shape[2])


@torch.library.custom_op("xtalgen::message_passing_grad_filter", mutates_args=())
def grad_filter_op(grad_out: Tensor, node_feats: Tensor, edge_index: Tensor, k_edges: int) -> Tensor:
    """d out / d edge_filter: (E, k_edges, C) = node_feats[s] * grad_out[t], summed over K if k_edges = 1 < K."""
    _check_device(grad_out, node_feats, edge_index)
    num_edges, k, channels = edge_index.shape[1], grad_out.shape[1], grad_out.shape[2]
    grad = grad_out.new_empty(num_edges, k_edges, channels)
    if grad.numel() == 0:
        return grad
    block_e, block_c = _blocks(channels)
    reduce_k = k_edges == 1 and k > 1
    grid = (triton.cdiv(num_edges, block_e), triton.cdiv(channels, block_c), 1 if reduce_k else k)
    _edge_product_kernel[grid](
        grad, node_feats, grad_out, edge_index[0], edge_index[1],
        num_edges, channels, k,
        grad.stride(0), grad.stride(1) if k_edges > 1 else 0,
        node_feats.stride(0), _k_stride(node_feats, k),
        grad_out.stride(0), grad_out.stride(1),
        REDUCE_K=reduce_k, ACC_DTYPE=_acc_dtype(grad.dtype),
        BLOCK_E=block_e, BLOCK_C=block_c,
    )
    return grad


@grad_filter_op.register_fake
def _(grad_out, node_feats, edge_index, k_edges):
    return grad_out.new_empty(edge_index.shape[1], k_edges, grad_out.shape[2])


def _setup_context(ctx, inputs, output):
    node_feats, edge_filter, edge_index, _ = inputs
    ctx.save_for_backward(node_feats, edge_filter, edge_index)


def _backward(ctx, grad_out):
    node_feats, edge_filter, edge_index = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_nodes = grad_filter = None
    if ctx.needs_input_grad[0]:
        grad_nodes = grad_nodes_op(grad_out, edge_filter, edge_index, node_feats.shape[0], node_feats.shape[1])
    if ctx.needs_input_grad[1]:
        grad_filter = grad_filter_op(grad_out, node_feats, edge_index, edge_filter.shape[1])
    return grad_nodes, grad_filter, None, None


message_passing_op.register_autograd(_backward, setup_context=_setup_context)


# -- backend ------------------------------------------------------------------------------------


def message_passing_triton(node_feats: Tensor, edge_filter: Tensor, edge_index: Tensor, num_nodes: int) -> Tensor:
    """The registry's backend signature: node_feats (N, K, C), edge_filter (E, K', C), 3-D and
    contiguous, -> (num_nodes, max(K, K'), C) in their promoted dtype, as `message_passing_torch`."""
    dtype = torch.promote_types(node_feats.dtype, edge_filter.dtype)
    return message_passing_op(
        node_feats.to(dtype).contiguous(), edge_filter.to(dtype).contiguous(), edge_index.long().contiguous(),
        int(num_nodes),
    )


def unavailable_reason() -> str | None:
    """Why the kernels cannot run in this process (no CUDA GPU and no interpreter), or None."""
    if INTERPRETED or torch.cuda.is_available():
        return None
    return "the triton message-passing backend needs a CUDA GPU (none is visible); use model.score_net.backend=torch"
