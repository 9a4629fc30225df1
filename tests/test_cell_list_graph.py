"""The cell-list radius graph against the sphere search: identical edges, offsets and order."""

from __future__ import annotations

import math

import pytest
import torch
from equivariance import flat_batch, jitter, structures_from_csv

import xtalgen.models.graph as graph_module
from xtalgen.models.graph import radius_graph_pbc, radius_graph_pbc_cell_list
from xtalgen.models.score_net import build_score_net
from xtalgen.schema.model import ScoreNetConfig

CUTOFF = 7.0


def _assert_same(cart, lattice, batch_index, num_atoms, max_neighbors=50, cutoff=CUTOFF, **kwargs):
    ref = radius_graph_pbc(cart, lattice, batch_index, num_atoms, cutoff, max_neighbors, **kwargs)
    got = radius_graph_pbc_cell_list(cart, lattice, batch_index, num_atoms, cutoff, max_neighbors, **kwargs)
    assert torch.equal(got.edge_index, ref.edge_index)
    assert torch.equal(got.cell_offsets, ref.cell_offsets)
    assert torch.equal(got.edge_vec, ref.edge_vec)
    return ref


def _cart(frac, lattice, batch_index):
    return torch.einsum("ni,nij->nj", frac, lattice[batch_index])


def _batch_of(frac_list, lattices):
    num_atoms = torch.tensor([f.shape[0] for f in frac_list])
    batch_index = torch.repeat_interleave(torch.arange(len(frac_list)), num_atoms)
    frac = torch.cat(frac_list)
    lattice = torch.stack(lattices)
    return _cart(frac, lattice, batch_index), lattice, batch_index, num_atoms


def _lattice_from_parameters(lengths, angles_deg):
    """Rows a, b, c of the cell with these lengths and angles (a along x, b in the xy plane)."""
    a, b, c = lengths
    alpha, beta, gamma = (math.radians(x) for x in angles_deg)
    cx = c * math.cos(beta)
    cy = c * (math.cos(alpha) - math.cos(beta) * math.cos(gamma)) / math.sin(gamma)
    cz2 = c * c - cx * cx - cy * cy
    if cz2 <= 0.05 * c * c:  # no such cell, or nearly flat
        return None
    return torch.tensor(
        [[a, 0, 0], [b * math.cos(gamma), b * math.sin(gamma), 0], [cx, cy, math.sqrt(cz2)]], dtype=torch.float64
    )


@pytest.mark.parametrize("which", ["perov", "carbon"])
@pytest.mark.parametrize("max_neighbors", [50, None])
def test_real_structures_raw_and_noisy(which, max_neighbors, perov_val, carbon_val):
    batch = flat_batch(structures_from_csv(perov_val if which == "perov" else carbon_val, 24))
    graph = _assert_same(_cart(batch.frac_coords, batch.lattice, batch.batch_index), batch.lattice,
                         batch.batch_index, batch.num_atoms, max_neighbors)
    assert graph.edge_index.shape[1] > 1000
    noisy = jitter(batch, 0.05, torch.Generator().manual_seed(1), sigma_lattice=0.15)
    _assert_same(_cart(noisy.frac_coords, noisy.lattice, noisy.batch_index), noisy.lattice, noisy.batch_index,
                 noisy.num_atoms, max_neighbors)


def test_random_skewed_cells_and_positions_outside_the_cell():
    gen = torch.Generator().manual_seed(7)
    frac_list, lattices = [], []
    while len(lattices) < 24:
        lengths = (2 + 13 * torch.rand(3, generator=gen, dtype=torch.float64)).tolist()
        angles = (40 + 100 * torch.rand(3, generator=gen, dtype=torch.float64)).tolist()
        lattice = _lattice_from_parameters(lengths, angles)
        if lattice is None:
            continue
        n = int(torch.randint(1, 9, (1,), generator=gen))
        frac = torch.rand(n, 3, generator=gen, dtype=torch.float64)
        if len(lattices) % 3 == 0:
            frac = frac * 5 - 2  # outside [0, 1): other cell copies
        frac_list.append(frac)
        lattices.append(lattice)
    cart, lattice, batch_index, num_atoms = _batch_of(frac_list, lattices)
    for max_neighbors in (50, 12, None):
        _assert_same(cart, lattice, batch_index, num_atoms, max_neighbors)
    # a sheared basis of the same lattices, and small chunks of structures
    shear = torch.tensor([[1.0, 0, 0], [2.0, 1, 0], [-1.0, 3.0, 1]], dtype=torch.float64)
    _assert_same(cart, shear @ lattice, batch_index, num_atoms, 50, max_pairs_per_chunk=2000)


def test_tiny_cell_many_images_one_atom_and_the_image_cap():
    # a cell shorter than cutoff / 3 along every direction, one along which the image cap binds,
    # single atoms (an atom's only neighbours are its own images), and float32 inputs
    frac_list = [torch.tensor([[0.1, 0.2, 0.3], [0.6, 0.5, 0.9]]), torch.tensor([[0.3, 0.3, 0.3]]),
                 torch.tensor([[-1.5, 2.25, 0.5]]), torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])]
    lattices = [torch.tensor([[2.0, 0, 0], [0.7, 2.1, 0], [0.3, -0.4, 1.9]]),
                torch.tensor([[2.3, 0, 0], [0, 2.0, 0], [0, 0, 2.1]]),
                torch.tensor([[0.4, 0, 0], [0.1, 5.0, 0], [0, 0.3, 6.0]]),  # 0.4 Å: > 12 images needed
                torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])]  # exact ties at the cap
    for dtype in (torch.float64, torch.float32):
        cart, lattice, batch_index, num_atoms = _batch_of([f.to(dtype) for f in frac_list],
                                                          [x.to(dtype) for x in lattices])
        for max_neighbors in (50, None):
            graph = _assert_same(cart, lattice, batch_index, num_atoms, max_neighbors)
            assert (graph.edge_index[0] == graph.edge_index[1]).any()
        _assert_same(cart, lattice, batch_index, num_atoms, 50, max_images_per_dim=3)


@pytest.mark.parametrize("radius_factor", [graph_module.DENSE_RADIUS_FACTOR, 0.4])
def test_collapsed_dense_cells_where_the_cap_binds(perov_val, carbon_val, monkeypatch, radius_factor):
    monkeypatch.setattr(graph_module, "DENSE_RADIUS_FACTOR", radius_factor)
    batch = flat_batch(structures_from_csv(perov_val, 3) + structures_from_csv(carbon_val, 2))
    batch = jitter(batch, 0.05, torch.Generator().manual_seed(5))
    lattice = batch.lattice.clone()
    lattice[0] = lattice[0] * 0.35  # collapsed: ~0.5 Å^3 per atom
    lattice[2] = lattice[2] * 0.5
    lattice[3] = lattice[3] * 0.4
    cart = _cart(batch.frac_coords, lattice, batch.batch_index)
    graph = _assert_same(cart, lattice, batch.batch_index, batch.num_atoms, 50)
    assert (torch.bincount(graph.edge_index[1]) == 50).all()
    _assert_same(cart, lattice, batch.batch_index, batch.num_atoms, 50, max_pairs_per_chunk=1)


def test_unknown_algorithm_is_refused():
    cart, lattice, batch_index, num_atoms = _batch_of([torch.zeros(1, 3, dtype=torch.float64)],
                                                      [torch.eye(3, dtype=torch.float64) * 3])
    with pytest.raises(ValueError, match="unknown radius-graph algorithm"):
        radius_graph_pbc(cart, lattice, batch_index, num_atoms, CUTOFF, 50, algorithm="octree")


def test_score_network_output_is_the_same_with_either_algorithm(perov_val):
    """`model.score_net.radius_graph=cell_list` gives the same network outputs, bit for bit."""
    batch = jitter(flat_batch(structures_from_csv(perov_val, 6)), 0.03, torch.Generator().manual_seed(3))
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    outputs = []
    for algorithm in ("sphere", "cell_list"):
        torch.manual_seed(0)  # the same weights
        config = ScoreNetConfig(preset="debug", hidden=32, num_layers=2, num_rbf=16, radius_graph=algorithm)
        net = build_score_net(config).double().eval()
        outputs.append(net(batch.atomic_numbers, batch.frac_coords, batch.lattice, batch.num_atoms,
                           batch.batch_index, t))
    for field in ("type_logits", "coord_vectors", "lattice_matrix"):
        assert torch.equal(getattr(outputs[1], field), getattr(outputs[0], field))


def test_an_unknown_radius_graph_is_refused_at_config_load():
    from xtalgen.schema import ConfigError, load_config

    assert load_config([], ["model.score_net.radius_graph=cell_list"]).model.score_net.radius_graph == "cell_list"
    with pytest.raises(ConfigError, match="radius_graph"):
        load_config([], ["model.score_net.radius_graph=octree"])
