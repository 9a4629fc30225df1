"""The element-wise chemical-system term of the element logits (`models.score_net.ElementSetGate`)."""

from __future__ import annotations

import pytest
import torch
from equivariance import flat_batch, jitter, structures_from_csv

from xtalgen.models.io import with_zero_additions
from xtalgen.models.score_net import ElementSetGate, build_score_net
from xtalgen.property_encoding import chemical_system_multi_hot
from xtalgen.schema.model import ConditionConfig, ScoreNetConfig

SMALL = ScoreNetConfig(preset="debug", hidden=32, num_layers=2, num_rbf=16)
CHEMSYS = [ConditionConfig(name="chemical_system", kind="chemical_system")]


def _multi_hot(*systems: str) -> torch.Tensor:
    return torch.stack([torch.from_numpy(chemical_system_multi_hot(s)) for s in systems]).double()  # (B, 100)


def test_known_answer_per_structure():
    """With gates fixed by the bias alone, the term is a * requested + b * (requested, not yet placed),
    and what counts as placed is the atom's own structure only (masked atoms place nothing)."""
    gate = ElementSetGate(4).double()
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([2.0, 5.0]))
    requested = _multi_hot("Ba-O-Ti", "Ba-O-Ti")
    # Structure 0 has placed Ba and O (one atom still masked); structure 1 has placed only Ti.
    atomic_numbers = torch.tensor([56, 8, 0, 22, 0, 0])
    batch_index = torch.tensor([0, 0, 0, 1, 1, 1])
    term = gate(torch.randn(6, 4, dtype=torch.float64), requested, atomic_numbers, batch_index)  # (6, 100)

    expected = torch.zeros(6, 100, dtype=torch.float64)
    for atom, structure in enumerate(batch_index.tolist()):
        for z in (56, 8, 22):
            placed = z in atomic_numbers[batch_index == structure].tolist()
            expected[atom, z - 1] = 2.0 + (0.0 if placed else 5.0)
    assert torch.equal(term, expected)


def test_every_element_is_treated_alike():
    """Relabelling the elements (a permutation of Z) permutes the term's columns the same way: what the
    gates learn on one chemical system carries over to any other."""
    generator = torch.Generator().manual_seed(0)
    gate = ElementSetGate(8).double()
    with torch.no_grad():
        gate.weight.copy_(torch.randn(2, 8, generator=generator, dtype=torch.float64))
        gate.bias.copy_(torch.randn(2, generator=generator, dtype=torch.float64))
    s = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    requested = _multi_hot("Li-Fe-P-O", "Cu-Zn")
    atomic_numbers = torch.tensor([3, 0, 15, 0, 29, 29, 0])
    batch_index = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    permutation = torch.randperm(100, generator=generator)  # new column of old column c: permutation[c]
    relabel = torch.cat([torch.zeros(1, dtype=torch.long), permutation + 1])  # Z -> new Z, mask stays 0

    term = gate(s, requested, atomic_numbers, batch_index)
    moved_request = torch.zeros_like(requested)
    moved_request[:, permutation] = requested
    moved = gate(s, moved_request, relabel[atomic_numbers], batch_index)
    assert torch.equal(moved[:, permutation], term)


@pytest.mark.parametrize("adapters", [False, True])
def test_network_term_acts_only_on_conditioned_rows_and_element_logits(perov_val, adapters):
    structures = structures_from_csv(perov_val, 4)
    batch = jitter(flat_batch(structures), 0.02, torch.Generator().manual_seed(3))
    masked = batch.atomic_numbers.clone()
    masked[::2] = 0  # half the atoms still masked, as in the middle of sampling
    torch.manual_seed(0)
    net = build_score_net(SMALL, conditions=CHEMSYS, adapters=adapters).double().eval()
    b = batch.num_atoms.shape[0]
    t = torch.linspace(0.1, 0.9, b, dtype=torch.float64)
    conditions = {"chemical_system": _multi_hot(*["Ba-O-Ti"] * b)}
    rows = torch.tensor([True, False, True, False])
    conditions["chemical_system"][1] = float("nan")  # an absent row may hold anything

    def run(**kwargs):
        return net(masked, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index, t, **kwargs)

    before = run(conditions=conditions, condition_mask={"chemical_system": rows})
    with torch.no_grad():  # a trained gate: the zero start must not hide the term
        net.element_set_gate.bias.copy_(torch.tensor([1.5, -0.5]))
        net.element_set_gate.weight.normal_(generator=torch.Generator().manual_seed(4))
    after = run(conditions=conditions, condition_mask={"chemical_system": rows})
    assert torch.isfinite(after.type_logits).all()
    assert torch.equal(after.coord_vectors, before.coord_vectors)
    assert torch.equal(after.lattice_matrix, before.lattice_matrix)
    on_conditioned_row = rows[batch.batch_index]
    changed = (after.type_logits != before.type_logits)
    assert torch.equal(changed.any(dim=1), on_conditioned_row)  # only atoms of conditioned rows
    assert not changed[:, [z - 1 for z in range(1, 101) if z not in (8, 22, 56)]].any()  # only Ba, O, Ti

    # Condition dropout in training gives a row the null token, and the term goes with it.
    net.conditioning.dropout = 1.0
    dropped = net.train()(masked, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index, t,
                          conditions=conditions)
    null = net.eval()(masked, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index, t)
    assert torch.equal(dropped.type_logits, null.type_logits)


def test_a_model_saved_without_the_gate_loads_with_its_zeros(perov_val):
    """A chemical-system model saved before the gate existed computes exactly what it did."""
    from xtalgen.models.diffusion import build_model
    from xtalgen.schema import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(score_net=SMALL, conditions=CHEMSYS, adapters=True), {"mean_density": 0.05})
    model = model.double().eval()
    older = {k: v for k, v in model.state_dict().items() if "element_set_gate" not in k}
    assert len(older) == len(model.state_dict()) - 2
    model.load_state_dict(with_zero_additions(model, older), strict=True)

    batch = flat_batch(structures_from_csv(perov_val, 3))
    masked = torch.where(torch.arange(len(batch.atomic_numbers)) % 2 == 0, 0, batch.atomic_numbers)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    system = {"chemical_system": _multi_hot("Ba-O-Ti", "Ca-O-Ti", "O-Sr-Ti")}

    def logits():
        return model.score_net(masked, batch.frac_coords, batch.lattice, batch.num_atoms, batch.batch_index, t,
                               conditions=system).type_logits

    with_gate = logits()
    model.score_net.element_set_gate = None  # the network as it was before the gate
    assert torch.equal(logits(), with_gate)
    model.score_net.element_set_gate = ElementSetGate(SMALL.hidden).double()
    with torch.no_grad():
        model.score_net.element_set_gate.bias.fill_(1.0)
    with pytest.raises(ValueError, match="should start at zero"):
        with_zero_additions(model, older)
