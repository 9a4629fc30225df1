"""The fused Triton message-passing backend against the pure-PyTorch reference.

On CPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, set by conftest.py before
anything imports Triton): the same kernel source, executed op by op, so these tests check the
kernels' indexing, masking, broadcasting and reductions, not their speed. Sizes stay small: the
interpreter runs each program in Python. The `gpu` tests repeat the parity at Alex-MP-20 sizes on
CUDA, in float32 and bf16.

Tolerances: float64 1e-12 and float32 1e-5 (relative to the largest output), since both sum the
same products in float32/float64, only in another order; bf16 inputs 2e-2, since the reference
rounds each message to bf16 before its float32 sum while the kernel multiplies in float32.
"""

from __future__ import annotations

import pytest
import torch

from xtalgen.models.graph import available_backends, message_passing

triton_mp = pytest.importorskip("xtalgen.models.triton_message_passing")
needs_kernels = pytest.mark.skipif(triton_mp.unavailable_reason() is not None,
                                   reason="no CUDA GPU and not under TRITON_INTERPRET=1")

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1.0).item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} (scale {scale:.3g}, {dtype})"


def _case(num_nodes, num_edges, channels, k_nodes, k_edges, dtype, device="cpu", sorted_targets=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    nodes = torch.randn(num_nodes, k_nodes, channels, generator=g, dtype=torch.float64).to(device, dtype)
    edges = torch.randn(num_edges, k_edges, channels, generator=g, dtype=torch.float64).to(device, dtype)
    index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    if sorted_targets:  # radius_graph_pbc's order
        index = index[:, torch.argsort(index[1], stable=True)]
    return nodes.requires_grad_(), edges.requires_grad_(), index.to(device)


def _parity(nodes, edges, index, num_nodes, dtype) -> None:
    out = message_passing(nodes, edges, index, num_nodes, backend="triton")
    ref = message_passing(nodes, edges, index, num_nodes, backend="torch")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _close(out, ref, dtype)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_out = grad_out.to(ref.device, ref.dtype)
    got = torch.autograd.grad(out, (nodes, edges), grad_out)
    want = torch.autograd.grad(ref, (nodes, edges), grad_out)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        _close(a, b, dtype)


def test_the_backend_is_registered():
    assert "triton" in available_backends()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("k_nodes", "k_edges"), [(1, 1), (3, 1), (1, 3), (3, 3)])
def test_forward_and_gradients_match_the_reference(dtype, k_nodes, k_edges):
    # 37 channels: not a power of two, so the channel mask is exercised; 300 edges over 9 targets
    # make several edge tiles per target.
    nodes, edges, index = _case(9, 300, 37, k_nodes, k_edges, dtype)
    _parity(nodes, edges, index, 9, dtype)


@needs_kernels
def test_unsorted_edges_targets_without_edges_and_extra_nodes():
    nodes, edges, index = _case(6, 50, 16, 3, 1, torch.float64, sorted_targets=False, seed=3)
    index[1][index[1] == 2] = 4  # target 2 receives nothing
    _parity(nodes, edges, index, 8, torch.float64)  # num_nodes > N: rows 6, 7 stay zero


@needs_kernels
def test_no_edges_gives_zeros_and_zero_gradients():
    nodes, edges, _ = _case(4, 0, 8, 1, 3, torch.float32)
    out = message_passing(nodes, edges, torch.zeros(2, 0, dtype=torch.long), 4, backend="triton")
    assert out.shape == (4, 3, 8) and not out.any()
    grad_nodes, = torch.autograd.grad(out.sum(), (nodes,))
    assert grad_nodes.shape == nodes.shape and not grad_nodes.any()


@needs_kernels
def test_a_bad_index_is_refused_before_any_kernel_reads_memory():
    nodes, edges, index = _case(4, 10, 8, 1, 1, torch.float32)
    index[0, 3] = 4
    with pytest.raises(IndexError, match="out of range"):
        message_passing(nodes, edges, index, 4, backend="triton")


@needs_kernels
def test_the_score_network_gives_the_same_outputs_and_gradients_with_either_backend(perov_val):
    """End to end: the debug score network on real Perov-5 cells, float64, both backends."""
    import pandas as pd
    from pymatgen.core import Structure

    from xtalgen.batch import collate
    from xtalgen.models.score_net import ScoreNetwork
    from xtalgen.record import CrystalRecord
    from xtalgen.schema import ScoreNetConfig

    rows = pd.read_csv(perov_val, nrows=3)
    records = [CrystalRecord.from_structure(Structure.from_str(cif, fmt="cif"), str(i))
               for i, cif in enumerate(rows["cif"])]
    batch = collate(records)
    outputs = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        net = ScoreNetwork(ScoreNetConfig(preset="debug", hidden=32, num_layers=2, backend=backend)).double()
        t = torch.full((batch.num_atoms.shape[0],), 0.5, dtype=torch.float64)
        out = net(batch.atomic_numbers, batch.frac_coords.double(), batch.lattice.double(), batch.num_atoms,
                  batch.batch_index, t)
        tensors = (out.type_logits, out.coord_vectors, out.lattice_matrix)
        loss = sum(x.square().sum() for x in tensors)
        grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])
        outputs[backend] = (tensors, grads)
    (ref, ref_grads), (got, got_grads) = outputs["torch"], outputs["triton"]
    for a, b in zip(got + got_grads, ref + ref_grads, strict=True):
        _close(a, b, torch.float64)


def test_without_a_gpu_or_interpreter_the_model_refuses_the_backend_with_the_config_key(monkeypatch):
    from xtalgen.models.score_net import ScoreNetwork
    from xtalgen.schema import ConfigError, ScoreNetConfig

    monkeypatch.setattr(triton_mp, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"'model.score_net.backend': the triton .* needs a CUDA GPU"):
        ScoreNetwork(ScoreNetConfig(preset="debug", hidden=16, num_layers=1, backend="triton"))
    ScoreNetwork(ScoreNetConfig(preset="debug", hidden=16, num_layers=1, backend="torch"))  # the CPU path


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("k_nodes", "k_edges"), [(1, 1), (3, 1), (1, 3)])
def test_gpu_parity_at_alex_mp_20_sizes(dtype, k_nodes, k_edges):
    # 256 structures of <= 20 atoms, <= 50 neighbours each; base's edge width.
    nodes, edges, index = _case(256 * 20, 256 * 20 * 50, 64, k_nodes, k_edges, dtype, device="cuda")
    _parity(nodes, edges, index, 256 * 20, dtype)
