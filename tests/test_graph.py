"""Periodic radius graph against pymatgen's neighbour lists, and the message-passing op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from equivariance import flat_batch, jitter, structures_from_csv
from pymatgen.core import Lattice, Structure

import xtalgen.models.graph as graph_module
from xtalgen.models.graph import (
    available_backends,
    message_passing,
    message_passing_torch,
    radius_graph_pbc,
    register_message_passing_backend,
)

CUTOFF = 7.0


def _graph(batch, max_neighbors=None, **kwargs):
    cart = torch.einsum("ni,nij->nj", batch.frac_coords, batch.lattice[batch.batch_index])
    graph = radius_graph_pbc(cart, batch.lattice, batch.batch_index, batch.num_atoms, CUTOFF, max_neighbors, **kwargs)
    return cart, graph


def _edge_dict(graph) -> dict[tuple, float]:
    """(source, target, offset) -> distance."""
    keys = zip(graph.edge_index[0].tolist(), graph.edge_index[1].tolist(), map(tuple, graph.cell_offsets.tolist()))
    return dict(zip(keys, graph.edge_vec.norm(dim=1).tolist()))


def _pymatgen_edges(structures, cutoff=CUTOFF) -> dict[tuple, float]:
    """Same keys from pymatgen, with atom indices offset to the flat batch."""
    edges, start = {}, 0
    for s in structures:
        centers, neighbors, images, dists = s.get_neighbor_list(cutoff)
        for c, n, im, d in zip(centers, neighbors, images, dists):
            edges[(start + int(n), start + int(c), tuple(int(round(x)) for x in im))] = float(d)
        start += len(s)
    return edges


def _wrapped(structures):
    # pymatgen's images are relative to the stored fractional coordinates: wrap them first so both
    # sides describe the same positions.
    return [Structure(s.lattice, s.species, np.mod(s.frac_coords, 1.0)) for s in structures]


@pytest.mark.parametrize("which", ["perov", "carbon"])
def test_same_edges_and_distances_as_pymatgen(which, perov_val, carbon_val):
    structures = _wrapped(structures_from_csv(perov_val if which == "perov" else carbon_val, 6))
    _, graph = _graph(flat_batch(structures))
    ours, ref = _edge_dict(graph), _pymatgen_edges(structures)
    assert len(ref) > 1000
    assert set(ours) == set(ref)
    np.testing.assert_allclose([ours[k] for k in ref], list(ref.values()), rtol=0, atol=1e-9)


def test_tiny_skewed_cell_needs_many_images():
    # A 1.6 Å, strongly sheared cell: the 7 Å sphere spans ~5 images along each direction.
    lattice = Lattice([[1.6, 0.0, 0.0], [1.3, 1.7, 0.0], [0.9, 0.7, 2.1]])
    structure = Structure(lattice, ["C", "O"], [[0.0, 0.0, 0.0], [0.37, 0.61, 0.23]])
    _, graph = _graph(flat_batch([structure]))
    ours, ref = _edge_dict(graph), _pymatgen_edges([structure])
    assert len(ref) > 500
    assert set(ours) == set(ref)
    # an atom sees its own periodic images, never itself at zero shift
    self_edges = graph.edge_index[0] == graph.edge_index[1]
    assert self_edges.any() and (graph.cell_offsets[self_edges].abs().sum(dim=1) > 0).all()


def test_non_finite_or_singular_cells_are_refused():
    eye = torch.eye(3, dtype=torch.float64) * 4
    cart, batch_index, num_atoms = torch.zeros(3, 3, dtype=torch.float64), torch.tensor([0, 1, 2]), torch.ones(3).long()
    nan_cell = eye.clone()
    nan_cell[0, 1] = float("nan")
    flat_cell = eye.clone()
    flat_cell[2] = flat_cell[0]  # zero volume
    with pytest.raises(ValueError, match=r"lattice in structures \[1, 2\]"):
        radius_graph_pbc(cart, torch.stack([eye, nan_cell, flat_cell]), batch_index, num_atoms, CUTOFF, 50)
    cart[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"coordinates in structures \[2\]"):
        radius_graph_pbc(cart, torch.stack([eye, eye, eye]), batch_index, num_atoms, CUTOFF, 50)


def test_nearest_k_are_kept_sorted_by_target_then_distance(carbon_val):
    structures = _wrapped(structures_from_csv(carbon_val, 4))
    batch = jitter(flat_batch(structures), 0.01, torch.Generator().manual_seed(0))
    structures = [
        Structure(s.lattice, s.species, batch.frac_coords[batch.batch_index == i].numpy())
        for i, s in enumerate(structures)
    ]
    k = 12
    _, graph = _graph(batch, max_neighbors=k)
    ref = _pymatgen_edges(structures)
    source, target = graph.edge_index
    dist = graph.edge_vec.norm(dim=1)
    assert (target[1:] >= target[:-1]).all()
    for atom in range(batch.frac_coords.shape[0]):
        ref_dists = sorted(d for (_, t, _), d in ref.items() if t == atom)[:k]
        ours = dist[target == atom]
        assert (ours[1:] >= ours[:-1]).all()
        np.testing.assert_allclose(ours.numpy(), ref_dists, atol=1e-9)


def test_ties_are_broken_deterministically(perov_val):
    # Unperturbed cubic perovskites have large shells of equal distances: the cut at k falls inside one.
    batch = flat_batch(structures_from_csv(perov_val, 3))
    _, first = _graph(batch, max_neighbors=20)
    _, second = _graph(batch, max_neighbors=20)
    assert torch.equal(first.edge_index, second.edge_index) and torch.equal(first.cell_offsets, second.cell_offsets)
    assert torch.bincount(first.edge_index[1]).max() == 20


def test_chunking_and_batching_do_not_change_the_graph(perov_val, carbon_val):
    structures = structures_from_csv(perov_val, 3) + structures_from_csv(carbon_val, 3)
    batch = flat_batch(structures)
    _, whole = _graph(batch, max_neighbors=50)
    _, chunked = _graph(batch, max_neighbors=50, max_pairs_per_chunk=1)  # one structure per chunk
    for field in ("edge_index", "cell_offsets"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field))
    torch.testing.assert_close(whole.edge_vec, chunked.edge_vec, rtol=0, atol=0)
    # each structure alone gives the same edges, with its atom indices shifted
    start, edges_seen = 0, 0
    for s in structures:
        _, alone = _graph(flat_batch([s]), max_neighbors=50)
        in_batch = (whole.edge_index[1] >= start) & (whole.edge_index[1] < start + len(s))
        assert torch.equal(whole.edge_index[:, in_batch] - start, alone.edge_index)
        edges_seen += alone.edge_index.shape[1]
        start += len(s)
    assert edges_seen == whole.edge_index.shape[1]


def test_positions_outside_the_cell_give_consistent_offsets(carbon_val):
    # jittered: with exact distance ties, 1e-16 rounding differences may pick another tied image
    batch = jitter(flat_batch(structures_from_csv(carbon_val, 2)), 0.01, torch.Generator().manual_seed(0))
    cart, graph = _graph(batch, max_neighbors=50)
    shifts = torch.randint(-3, 4, batch.frac_coords.shape, generator=torch.Generator().manual_seed(1))
    moved = torch.einsum("ni,nij->nj", batch.frac_coords + shifts, batch.lattice[batch.batch_index])
    moved_graph = radius_graph_pbc(moved, batch.lattice, batch.batch_index, batch.num_atoms, CUTOFF, 50)
    assert torch.equal(moved_graph.edge_index, graph.edge_index)
    torch.testing.assert_close(moved_graph.edge_vec, graph.edge_vec, rtol=0, atol=1e-9)
    # edge_vec is exactly x_src + offset @ L - x_tgt for the positions as given
    source, target = moved_graph.edge_index
    lat = batch.lattice[batch.batch_index[target]]
    expect = moved[source] + torch.einsum("ei,eij->ej", moved_graph.cell_offsets.double(), lat) - moved[target]
    torch.testing.assert_close(moved_graph.edge_vec, expect, rtol=0, atol=1e-12)


def test_edge_vectors_are_differentiable_in_positions_and_lattice(perov_val):
    batch = jitter(flat_batch(structures_from_csv(perov_val, 1)), 0.02, torch.Generator().manual_seed(2))
    cart = torch.einsum("ni,nij->nj", batch.frac_coords, batch.lattice[batch.batch_index])
    cutoff = 4.5

    def per_atom_field(cart, lattice):
        # Edge order moves with near-equal distances, so check an order-free aggregate whose terms
        # vanish smoothly at the cutoff: sum over edges of (c^2 - |r|^2)^2 r, per target atom.
        graph = radius_graph_pbc(cart, lattice, batch.batch_index, batch.num_atoms, cutoff, None)
        r = graph.edge_vec
        terms = (cutoff**2 - r.pow(2).sum(dim=1, keepdim=True)) ** 2 * r  # (E, 3)
        return torch.zeros_like(cart).index_add(0, graph.edge_index[1], terms)

    inputs = (cart.clone().requires_grad_(), batch.lattice.clone().requires_grad_())
    assert torch.autograd.gradcheck(per_atom_field, inputs, eps=1e-6, atol=1e-5, rtol=1e-6)


def _random_message_inputs(num_nodes=7, num_edges=23, channels=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    node = torch.randn(num_nodes, channels, generator=g, dtype=torch.float64)
    filt = torch.randn(num_edges, channels, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, num_nodes, (2, num_edges), generator=g)
    return node, filt, edge_index


def test_message_passing_matches_dense_sum():
    node, filt, edge_index = _random_message_inputs()
    out = message_passing(node, filt, edge_index)
    expect = torch.zeros_like(node)
    for e in range(edge_index.shape[1]):  # the definition, one edge at a time
        expect[edge_index[1, e]] += node[edge_index[0, e]] * filt[e]
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    # nodes with no incoming edge get zeros; num_nodes may exceed the source count
    wide = message_passing(node, filt, edge_index, num_nodes=10)
    assert wide.shape == (10, 5) and torch.equal(wide[7:], torch.zeros(3, 5, dtype=torch.float64))


def test_message_passing_gradcheck_float64():
    node, filt, edge_index = _random_message_inputs(seed=3)
    inputs = (node.requires_grad_(), filt.requires_grad_())
    assert torch.autograd.gradcheck(lambda n, f: message_passing(n, f, edge_index, 7), inputs)


def test_backend_registry():
    with pytest.raises(ValueError, match="unknown message-passing backend"):
        message_passing(*_random_message_inputs(), backend="no-such-backend")
    calls = []

    def counting_backend(node, filt, edge_index, num_nodes):
        calls.append(num_nodes)
        return message_passing_torch(node, filt, edge_index, num_nodes)

    register_message_passing_backend("test-counting", counting_backend)
    assert "torch" in available_backends() and "test-counting" in available_backends()
    node, filt, edge_index = _random_message_inputs()
    out = message_passing(node, filt, edge_index, backend="test-counting")
    assert calls == [7] and torch.equal(out, message_passing(node, filt, edge_index))
    with pytest.raises(ValueError, match="share C"):
        message_passing(node, filt[:, :3], edge_index)
    with pytest.raises(ValueError, match="broadcast over K"):
        message_passing(node.view(7, 1, 5).expand(7, 2, 5), filt.view(23, 1, 5).expand(23, 3, 5), edge_index)


def test_message_passing_broadcasts_over_the_middle_axis():
    node, filt, edge_index = _random_message_inputs(channels=4)
    vectors = torch.randn(7, 3, 4, dtype=torch.float64)
    directions = torch.randn(23, 3, 4, dtype=torch.float64)
    # vector features times a scalar filter == three scalar problems
    out = message_passing(vectors, filt[:, None], edge_index)
    for k in range(3):
        torch.testing.assert_close(out[:, k], message_passing(vectors[:, k], filt, edge_index))
    # scalar features times a directional filter
    out = message_passing(node[:, None], directions, edge_index)
    for k in range(3):
        torch.testing.assert_close(out[:, k], message_passing(node, directions[:, k], edge_index))
    inputs = (node.clone().requires_grad_(), directions.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda n, d: message_passing(n[:, None], d, edge_index), inputs)


def _capped_full_search(cart, lattice, batch_index, num_atoms, cutoff, max_neighbors):
    """The reference cap: the first `max_neighbors` per target of the full, ordered search."""
    full = radius_graph_pbc(cart, lattice, batch_index, num_atoms, cutoff, None)
    target = full.edge_index[1]
    first = torch.searchsorted(target, target, right=False)
    keep = torch.arange(target.numel()) - first < max_neighbors
    return full.edge_index[:, keep], full.cell_offsets[keep]


@pytest.mark.parametrize("radius_factor", [graph_module.DENSE_RADIUS_FACTOR, 0.4])
def test_dense_and_skewed_cells_give_the_graph_of_a_full_search(perov_val, monkeypatch, radius_factor):
    """Collapsed cells are searched within a smaller radius first (and again in full where that
    radius held too few neighbours: forced with a small factor); skewed ones in a reduced basis.
    The kept edges and their order must be exactly those of the full search, capped."""
    monkeypatch.setattr(graph_module, "DENSE_RADIUS_FACTOR", radius_factor)
    batch = jitter(flat_batch(structures_from_csv(perov_val, 4)), 0.05, torch.Generator().manual_seed(5))
    shear = torch.tensor([[1.0, 0, 0], [2.0, 1, 0], [-1.0, 3.0, 1]], dtype=batch.lattice.dtype)  # det 1
    lattice = batch.lattice.clone()
    lattice[0] = lattice[0] * 0.35  # collapsed: ~0.5 Å^3 per atom
    lattice[1] = shear @ lattice[1]  # the same lattice in a skewed basis
    lattice[2] = shear @ lattice[2] * 0.5
    cart = torch.einsum("ni,nij->nj", batch.frac_coords, lattice[batch.batch_index])
    got = radius_graph_pbc(cart, lattice, batch.batch_index, batch.num_atoms, 7.0, 50)
    edge_index, offsets = _capped_full_search(cart, lattice, batch.batch_index, batch.num_atoms, 7.0, 50)
    assert torch.equal(got.edge_index, edge_index)
    assert torch.equal(got.cell_offsets, offsets)
    assert (torch.bincount(got.edge_index[1]) == 50).all()  # every atom of these cells has 50 neighbours


def test_sphere_search_visits_exactly_the_lattice_points_of_a_box_search():
    """Fincke-Pohst enumeration of each pair's sphere against a brute force over its image box, on
    random sheared and flattened cells: the same (pair, shift) points within the radius."""
    gen = torch.Generator().manual_seed(3)
    lattice = torch.randn(40, 3, 3, generator=gen, dtype=torch.float64) * 3
    lattice[::4] *= torch.tensor([1.0, 1.0, 0.2], dtype=torch.float64)[:, None]  # thin cells
    upper = graph_module._upper_triangular_factor(lattice)
    frac = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close((frac @ lattice).norm(dim=-1).squeeze(1), (upper @ frac.T).norm(dim=1).squeeze(1))
    diff = torch.rand(40, 3, generator=gen, dtype=torch.float64) * 2 - 1
    radius = torch.rand(40, generator=gen, dtype=torch.float64) * 6 + 1
    images = torch.full((40, 3), 6, dtype=torch.long)
    pair, shift = graph_module._sphere_points(diff, upper, radius, images)

    box = torch.cartesian_prod(*[torch.arange(-6, 7)] * 3)  # (13^3, 3)
    dist = torch.einsum("pbi,pij->pbj", diff[:, None] + box.double(), lattice).norm(dim=-1)  # (P, 13^3)
    inside = dist < radius[:, None]
    expected = {(p, tuple(box[b].tolist())) for p, b in inside.nonzero().tolist()}
    found = set(zip(pair.tolist(), map(tuple, shift.tolist())))
    assert len(expected) > 1000
    assert expected <= found  # nothing within the radius is missed
    extra = [(p, s) for p, s in found - expected]
    extra_dist = [float(((diff[p] + torch.tensor(s).double()) @ lattice[p]).norm()) for p, s in extra]
    assert all(abs(d - float(radius[p])) < 1e-6 for (p, _), d in zip(extra, extra_dist))  # only boundary slack
