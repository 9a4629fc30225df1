"""Score network: API, symmetries on real crystals, supercells, batching, adapters, presets."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from dataclasses import replace

import pytest
import torch
from equivariance import FlatBatch, assert_symmetries, flat_batch, jitter, structures_from_csv

from xtalgen.cli import main as cli_main
from xtalgen.models.graph import message_passing_torch, register_message_passing_backend
from xtalgen.models.score_net import (
    PRESETS,
    ScoreNetwork,
    ScoreOutput,
    build_score_net,
    count_parameters,
    preset_parameter_count,
    resolve_architecture,
)
from xtalgen.schema.model import ConditionConfig, ScoreNetConfig

SMALL = ScoreNetConfig(preset="debug", hidden=32, num_layers=2, num_rbf=16)
CONDITIONS = [
    ConditionConfig(name="band_gap", kind="scalar"),
    ConditionConfig(name="space_group", kind="space_group"),
]


def _net(cfg=SMALL, seed=0, dtype=torch.float64, **kwargs) -> ScoreNetwork:
    torch.manual_seed(seed)
    return build_score_net(cfg, **kwargs).to(dtype).eval()


def _times(batch: FlatBatch) -> torch.Tensor:
    b = batch.num_atoms.shape[0]
    return torch.linspace(0.05, 0.95, b, dtype=batch.lattice.dtype)


def _run(net, batch: FlatBatch, **kwargs) -> ScoreOutput:
    return net(batch.atomic_numbers, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index,
               _times(batch), **kwargs)


def _as_tuple(net):
    def fn(batch):
        out = _run(net, batch)
        return out.type_logits, out.coord_vectors, out.lattice_matrix

    return fn


@pytest.fixture(scope="module")
def mixed_structures(perov_val, carbon_val):
    return structures_from_csv(perov_val, 3) + structures_from_csv(carbon_val, 3)


def test_output_shapes_dtypes_and_symmetric_lattice(mixed_structures):
    batch = flat_batch(mixed_structures, torch.float32)
    batch = replace(batch, atomic_numbers=batch.atomic_numbers.clone())
    batch.atomic_numbers[::3] = 0  # mask tokens of the absorbing type diffusion
    out = _run(_net(ScoreNetConfig(preset="debug"), dtype=torch.float32), batch)
    n, b = batch.frac_coords.shape[0], batch.num_atoms.shape[0]
    assert out.type_logits.shape == (n, 100) and out.coord_vectors.shape == (n, 3)
    assert out.lattice_matrix.shape == (b, 3, 3)
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in vars(out).values())
    assert torch.equal(out.lattice_matrix, out.lattice_matrix.transpose(1, 2))


def test_debug_preset_symmetries_float64_default_neighbours(mixed_structures):
    # Noised as in diffusion, so the 50-nearest cut has no exact distance ties.
    gen = torch.Generator().manual_seed(0)
    batch = jitter(flat_batch(mixed_structures), 0.02, gen)
    assert_symmetries(_as_tuple(_net(ScoreNetConfig(preset="debug"))), batch, gen, rtol=1e-9, atol=1e-10)


def test_symmetries_of_exact_symmetric_crystals_with_all_neighbours(mixed_structures):
    # Unperturbed crystals have shells of equal distances; keeping every neighbour within the cutoff
    # makes the graph itself exactly symmetric.
    cfg = replace(SMALL, max_neighbors=10_000)
    gen = torch.Generator().manual_seed(1)
    assert_symmetries(_as_tuple(_net(cfg)), flat_batch(mixed_structures), gen, rtol=1e-9, atol=1e-10)


def test_symmetries_float32_loose(mixed_structures):
    gen = torch.Generator().manual_seed(2)
    # float32 rounding (~1e-6 Å) splits exactly degenerate shells, so the lattice is noised too
    batch = jitter(flat_batch(mixed_structures, torch.float32), 0.02, gen, sigma_lattice=0.02)
    assert_symmetries(_as_tuple(_net(SMALL, dtype=torch.float32)), batch, gen, rtol=1e-4, atol=1e-5)


def _supercell(batch: FlatBatch, reps=(2, 1, 2)) -> FlatBatch:
    """Single-structure supercell built by hand: copies of the cell in image-major order."""
    shifts = torch.cartesian_prod(*[torch.arange(r) for r in reps]).to(batch.frac_coords.dtype)  # (K, 3)
    scale = torch.tensor(reps, dtype=batch.frac_coords.dtype)
    frac = ((batch.frac_coords[None] + shifts[:, None]) / scale).reshape(-1, 3)
    n = frac.shape[0]
    return FlatBatch(
        atomic_numbers=batch.atomic_numbers.repeat(len(shifts)),
        frac_coords=frac,
        lattice=batch.lattice * scale[None, :, None],
        num_atoms=torch.tensor([n]),
        batch_index=torch.zeros(n, dtype=torch.long),
    )


@pytest.mark.parametrize("reps", [(2, 1, 2), (2, 2, 2)])
def test_supercell_gives_the_same_per_atom_and_lattice_outputs(carbon_val, reps):
    """Per-atom outputs are the same for any supercell. The lattice output too for a k x k x k one:
    its cell term reads the cell in units of the prior's cube, (N / rho)^(1/3), which scales with it.
    A (2, 1, 2) supercell changes the cell's shape, and so its lattice target: only the edge part of
    the lattice output must stay the same there."""
    batch = jitter(flat_batch(structures_from_csv(carbon_val, 1, skip=5)), 0.02, torch.Generator().manual_seed(3))
    net = _net(ScoreNetConfig(preset="debug"))
    t = torch.tensor([0.3], dtype=torch.float64)
    cell = net(batch.atomic_numbers, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index, t)
    sc = _supercell(batch, reps)
    big = net(sc.atomic_numbers, sc.frac_coords, sc.lattice, sc.num_atoms, sc.batch_index, t)
    copies = sc.frac_coords.shape[0] // batch.frac_coords.shape[0]
    torch.testing.assert_close(big.type_logits, cell.type_logits.repeat(copies, 1), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(big.coord_vectors, cell.coord_vectors.repeat(copies, 1), rtol=1e-9, atol=1e-10)
    if len(set(reps)) == 1:
        torch.testing.assert_close(big.lattice_matrix, cell.lattice_matrix, rtol=1e-9, atol=1e-10)
    else:
        edge_part = [
            out.lattice_matrix - net._cell_term(*_cell_term_inputs(net, b, t))
            for out, b in ((cell, batch), (big, sc))
        ]
        torch.testing.assert_close(edge_part[1], edge_part[0], rtol=1e-9, atol=1e-10)
        assert not torch.allclose(big.lattice_matrix, cell.lattice_matrix)  # the cell term saw the shape


def _cell_term_inputs(net, b: FlatBatch, t):
    """Recompute the cell term's inputs (final atom scalars, conditioning) with hooks on the net."""
    captured = {}
    hook = net.final_norm.register_forward_hook(lambda m, i, o: captured.setdefault("s", o))
    net(b.atomic_numbers, b.frac_coords, b.lattice, b.num_atoms, b.batch_index, t)
    hook.remove()
    cond = net.time_embedding(t)
    return captured["s"], cond, b.lattice, b.num_atoms, b.batch_index


def test_bfloat16_network_tracks_its_float32_copy(perov_val):
    # DeepSpeed bf16 runs the whole module in bf16: time features, geometry and sums over edges must
    # stay in float32 inside, or errors reach tens of percent.
    batch = jitter(flat_batch(structures_from_csv(perov_val, 4), torch.float32), 0.01, torch.Generator().manual_seed(7))
    net = _net(ScoreNetConfig(preset="debug"), dtype=torch.bfloat16, conditions=CONDITIONS[:1])
    conditions = {"band_gap": torch.tensor([0.5, 1.0, 2.0, 4.0])}
    low = _run(net, batch, conditions=conditions)
    high = _run(net.float(), batch, conditions=conditions)
    for field in ("type_logits", "coord_vectors", "lattice_matrix"):
        a, r = getattr(low, field), getattr(high, field)
        assert a.dtype == torch.bfloat16
        assert (a.float() - r).norm() / r.norm() < 0.05, field


def test_structures_in_a_batch_do_not_interact(mixed_structures):
    net = _net()
    batch = flat_batch(mixed_structures)
    together = _run(net, batch)
    t_all, start = _times(batch), 0
    for i, s in enumerate(mixed_structures):
        one = flat_batch([s])
        alone = net(one.atomic_numbers, one.frac_coords, one.lattice, one.num_atoms, one.batch_index, t_all[i : i + 1])
        rows = slice(start, start + len(s))
        torch.testing.assert_close(together.type_logits[rows], alone.type_logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(together.coord_vectors[rows], alone.coord_vectors, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(together.lattice_matrix[i], alone.lattice_matrix[0], rtol=1e-10, atol=1e-12)
        start += len(s)


def test_time_and_types_change_the_outputs_and_every_parameter_gets_a_gradient(mixed_structures):
    net = _net(dtype=torch.float32).train()
    batch = jitter(flat_batch(mixed_structures, torch.float32), 0.02, torch.Generator().manual_seed(4))
    out = _run(net, batch)
    later = net(batch.atomic_numbers, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index,
                _times(batch) * 0 + 0.99)
    assert not torch.allclose(out.coord_vectors, later.coord_vectors)
    masked = net(batch.atomic_numbers * 0, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index,
                 _times(batch))
    assert not torch.allclose(out.lattice_matrix, masked.lattice_matrix)
    loss = out.type_logits.pow(2).mean() + out.coord_vectors.pow(2).mean() + out.lattice_matrix.pow(2).mean()
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_activation_checkpointing_gives_identical_outputs_and_gradients(perov_val):
    batch = jitter(flat_batch(structures_from_csv(perov_val, 3)), 0.02, torch.Generator().manual_seed(8))
    results = []
    for checkpointing in (False, True):
        net = _net(SMALL).train()
        net.activation_checkpointing = checkpointing
        out = _run(net, batch)
        (out.coord_vectors.square().sum() + out.lattice_matrix.square().sum() + out.type_logits.square().sum()).backward()
        results.append((out, {k: p.grad for k, p in net.named_parameters()}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    assert torch.equal(plain.coord_vectors, ckpt.coord_vectors)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_conditions_at_input_change_outputs_and_null_equals_absent(mixed_structures):
    net = _net(conditions=CONDITIONS)
    batch = flat_batch(mixed_structures)
    b = batch.num_atoms.shape[0]
    conditions = {"band_gap": torch.linspace(0, 4, b, dtype=torch.float64), "space_group": torch.full((b,), 221)}
    absent = _run(net, batch)
    present = _run(net, batch, conditions=conditions)
    all_masked = _run(net, batch, conditions=conditions,
                      condition_mask={k: torch.zeros(b, dtype=torch.bool) for k in conditions})
    assert not torch.allclose(present.coord_vectors, absent.coord_vectors)
    assert torch.equal(all_masked.coord_vectors, absent.coord_vectors)
    assert torch.equal(all_masked.lattice_matrix, absent.lattice_matrix)
    with pytest.raises(ValueError, match="not conditioned"):
        _run(_net(), batch, conditions=conditions)


def _finetune_inputs(batch):
    b = batch.num_atoms.shape[0]
    return {"band_gap": torch.full((b,), 3.0, dtype=torch.float64), "space_group": torch.arange(1, b + 1)}


def test_adapters_reproduce_the_base_model_bit_for_bit(mixed_structures):
    batch = jitter(flat_batch(mixed_structures), 0.02, torch.Generator().manual_seed(5))
    base = _net(ScoreNetConfig(preset="debug"), seed=0)
    reference = _run(base, batch)

    # MatterGen's fine-tuning: conditions + adapters on top of a pre-trained unconditional base.
    tuned = _net(ScoreNetConfig(preset="debug"), seed=1, conditions=CONDITIONS, adapters=True)
    result = tuned.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(("adapters.", "type_adapter.", "conditioning.")) for k in result.missing_keys)
    out = _run(tuned, batch, conditions=_finetune_inputs(batch))
    for field in ("type_logits", "coord_vectors", "lattice_matrix"):
        assert torch.equal(getattr(out, field), getattr(reference, field)), field

    # add_adapters() on a conditioned model leaves its outputs unchanged too.
    conditioned = _net(ScoreNetConfig(preset="debug"), conditions=CONDITIONS)
    before = _run(conditioned, batch, conditions=_finetune_inputs(batch))
    conditioned.add_adapters()
    after = _run(conditioned, batch, conditions=_finetune_inputs(batch))
    assert len(conditioned.adapters) == len(conditioned.layers)
    assert torch.equal(before.coord_vectors, after.coord_vectors)
    assert torch.equal(before.lattice_matrix, after.lattice_matrix)
    assert torch.equal(before.type_logits, after.type_logits)


def test_freeze_base_trains_only_adapters_and_property_embeddings(mixed_structures):
    batch = jitter(flat_batch(mixed_structures), 0.02, torch.Generator().manual_seed(6))
    net = _net(conditions=CONDITIONS, adapters=True).train()
    base_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(("adapters", "type_adapter", "conditioning"))}
    trainable = net.freeze_base()
    assert {id(p) for p in trainable} == {id(p) for p in net.parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable) < count_parameters(net)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    reference = _run(net.eval(), batch, conditions=_finetune_inputs(batch))
    for _ in range(2):  # the adapters' first step only moves their zero output layer
        out = _run(net.train(), batch, conditions=_finetune_inputs(batch))
        (out.coord_vectors.pow(2).sum() + out.lattice_matrix.pow(2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _run(net.eval(), batch, conditions=_finetune_inputs(batch))
    assert not torch.allclose(after.coord_vectors, reference.coord_vectors)
    for key, value in net.state_dict().items():
        if key in base_before:
            assert torch.equal(value, base_before[key]), key


def test_adapters_need_conditions():
    with pytest.raises(ValueError, match="need at least one condition"):
        build_score_net(SMALL, adapters=True)


def test_backend_from_config_is_used_and_unknown_backends_are_refused(perov_val):
    calls = []

    def recording_backend(node, filt, edge_index, num_nodes):
        calls.append(tuple(node.shape))
        return message_passing_torch(node, filt, edge_index, num_nodes)

    register_message_passing_backend("test-recording", recording_backend)
    batch = flat_batch(structures_from_csv(perov_val, 2))
    reference = _run(_net(SMALL), batch)
    out = _run(_net(replace(SMALL, backend="test-recording")), batch)
    # the scalar message per layer; the vector and directional terms share one hand-fused scatter
    assert len(calls) == SMALL.num_layers
    assert torch.equal(out.coord_vectors, reference.coord_vectors)
    with pytest.raises(ValueError, match="not registered"):
        build_score_net(replace(SMALL, backend="no-such-kernel"))


def test_config_overrides_and_unknown_preset():
    from xtalgen.schema import ConfigError, load_config

    net = build_score_net(ScoreNetConfig(preset="debug", hidden=24, num_layers=3))
    assert net.hidden == 24 and len(net.layers) == 3
    # None (not 0) takes the preset's size; 0, as written before, still means the same
    assert ScoreNetConfig().hidden is None and ScoreNetConfig(hidden=0, edge_hidden=0).edge_hidden is None
    assert resolve_architecture(ScoreNetConfig(preset="base")) == PRESETS["base"]
    # the preset name and the sizes are checked when the config loads, naming the key
    with pytest.raises(ConfigError, match="config key 'model.score_net.preset'"):
        load_config([], ["model.score_net.preset=huge"])
    with pytest.raises(ConfigError, match="config key 'model.score_net.num_layers'"):
        load_config([], ["model.score_net.num_layers=-1"])


def test_preset_sizes():
    counts = {name: preset_parameter_count(name) for name in PRESETS}
    assert 0.8e6 <= counts["debug"] <= 1.3e6
    assert 40e6 <= counts["base"] <= 50e6  # MatterGen's GemNet-dT: 44.6M
    assert 250e6 <= counts["large"] <= 350e6
    assert counts["xl"] >= 1e9
    # the meta-device count is the count of the real module
    assert counts["debug"] == count_parameters(build_score_net(ScoreNetConfig(preset="debug")))
    cfg = ScoreNetConfig(preset="debug", hidden=40, num_layers=3, num_rbf=8)
    assert count_parameters(build_score_net(cfg)) == _analytic_count(40, 3, 8, 40)  # edge width capped at hidden
    cfg = ScoreNetConfig(preset="debug", hidden=40, num_layers=3, num_rbf=8, edge_hidden=16)
    assert count_parameters(build_score_net(cfg)) == _analytic_count(40, 3, 8, 16)


def _analytic_count(h: int, layers: int, k: int, he: int) -> int:
    """Hand count of the architecture, to catch silent changes to it."""
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    mlp = lambda i, m, o: linear(i, m) + linear(m, o)  # noqa: E731
    per_layer = (
        2 * h  # LayerNorm
        + linear(h, 2 * h)  # FiLM
        + mlp(h, h, 3 * he)  # phi
        + linear(k, 3 * he)  # filter
        + linear(h, he, bias=False) + linear(he, h) + linear(he, h, bias=False)  # into / out of the edge width
        + linear(h, 2 * h, bias=False)  # U, V
        + mlp(2 * h, h, 3 * h)  # update
    )
    # the first layer's vector features are zero: no vector-to-vector term (phi, filter, projection)
    first_layer_saving = he * (h + 1) + he * (k + 1) + h * he
    embeddings = 101 * h + mlp(256, h, h)  # atom types (with mask) + time
    heads = (
        2 * h  # final LayerNorm
        + mlp(h, h, 100)  # types
        + mlp(h, h, h) + linear(h, 1, bias=False)  # coordinates
        + linear(h, he) + linear(k, he, bias=False) + linear(he, 1) + mlp(h, h, 1)  # lattice: edges, iso
        + mlp(3, h, h) + mlp(3 * h, h, 2)  # lattice: cell invariants, coefficients of I and X - I
    )
    return embeddings + layers * per_layer - first_layer_saving + heads


def test_model_info_cli_prints_real_counts():
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli_main(["model", "info"]) == 0
    text = buffer.getvalue()
    for name in PRESETS:
        assert f"{preset_parameter_count(name):,}" in text and name in text
    with redirect_stdout(io.StringIO()):
        assert cli_main(["model", "info", "--preset", "nope"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_radial_basis_has_no_subnormal_entries_and_is_the_gaussian_elsewhere(dtype):
    """Subnormal entries make CPU exp() and the filter matmul many times slower; they become 0,
    and every other entry is exp(-γ (d - μ)²) times the cutoff envelope, as before."""
    from xtalgen.models.layers import GaussianRBF, cosine_cutoff

    rbf_layer = GaussianRBF(num_rbf=32, cutoff=7.0)
    dist = torch.linspace(0.0, 7.5, 2001).to(dtype)
    got = rbf_layer(dist).double()  # (E, K)
    d64, centres = dist.double(), rbf_layer.centers.to(dtype).double()
    exact = torch.exp(-rbf_layer.gamma * (d64[:, None] - centres) ** 2) * cosine_cutoff(d64, 7.0)[:, None]
    tiny = torch.finfo(dtype).tiny
    assert not ((got != 0) & (got.abs() < tiny)).any()
    assert (got[exact < tiny / 2] == 0).all()
    if dtype == torch.bfloat16:  # its own arithmetic is too coarse for a value comparison
        return
    assert (got == 0).float().mean() > (0.3 if dtype == torch.float32 else 0.0)
    # Exponents up to 69 (float32's exp is good to ~70 ulp there), and away from the cutoff, where
    # the envelope's 1 + cos cancels.
    compared = (exact > 1e-30) & (d64 < 6.5)[:, None]
    rel = ((got - exact) / exact)[compared].abs()
    assert rel.max() < (1e-4 if dtype == torch.float32 else 1e-12)


def test_compiled_layers_match_the_eager_network_for_every_graph_size(mixed_structures):
    """`sample.compile`: inductor-compiled layers give the eager outputs to float32 rounding, for
    batches whose atom and edge counts differ (one dynamic compilation serves them all)."""
    from xtalgen.models.score_net import compile_layers

    torch._dynamo.reset()
    eager = _net(SMALL, dtype=torch.float32)
    compiled = compile_layers(_net(SMALL, dtype=torch.float32))
    for structures in (mixed_structures[:2], mixed_structures):
        batch = jitter(flat_batch(structures), 0.02, torch.Generator().manual_seed(3))
        batch = replace(batch, frac_coords=batch.frac_coords.float(), lattice=batch.lattice.float())
        with torch.no_grad():
            want, got = _run(eager, batch), _run(compiled, batch)
        for name in ("type_logits", "coord_vectors", "lattice_matrix"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5, msg=name)
