"""Property embeddings: kinds, null tokens, condition dropout, combination, validation."""

from __future__ import annotations

import pytest
import torch

from xtalgen.models.conditioning import ConditionEmbedding, ScalarEmbedding
from xtalgen.schema.model import ConditionConfig

HIDDEN = 8
ALL_KINDS = [
    ConditionConfig(name="band_gap", kind="scalar"),
    ConditionConfig(name="magnetic_class", kind="categorical", num_classes=4),
    ConditionConfig(name="chemical_system", kind="chemical_system"),
    ConditionConfig(name="space_group", kind="space_group"),
]


def _values(b: int = 4) -> dict[str, torch.Tensor]:
    chem = torch.zeros(b, 100)
    chem[:, 7] = 1.0  # O
    chem[torch.arange(b), 20 + torch.arange(b)] = 1.0  # one metal per structure
    return {
        "band_gap": torch.tensor([0.0, 1.5, 3.0, float("nan")], dtype=torch.float64)[:b],
        "magnetic_class": torch.tensor([0, 1, 3, 2])[:b],
        "chemical_system": chem,
        "space_group": torch.tensor([1, 62, 230, 0])[:b],  # 0: absent, must not be looked up
    }


def _masks(b: int = 4) -> dict[str, torch.Tensor]:
    present = torch.tensor([True, True, True, False])[:b]
    return {name: present for name in _values(b)}


def _embedding(conditions=ALL_KINDS, dropout=0.0, seed=0) -> ConditionEmbedding:
    torch.manual_seed(seed)
    return ConditionEmbedding(conditions, HIDDEN, dropout).eval()


def test_each_kind_embeds_and_absent_rows_get_the_null_token():
    for cond in ALL_KINDS:
        emb = _embedding([cond])
        value, mask = _values()[cond.name], _masks()[cond.name]
        out = emb(4, {cond.name: value}, {cond.name: mask})
        assert out.shape == (4, HIDDEN) and torch.isfinite(out).all()
        null = emb.null_tokens[cond.name]
        assert torch.equal(out[3], null), cond.kind
        assert not any(torch.allclose(out[i], null) for i in range(3)), cond.kind
        assert not torch.allclose(out[0], out[1]), cond.kind  # different values, different embeddings
        # a missing property, or an all-False mask, is the null token everywhere
        assert torch.equal(emb(4), null.expand(4, -1))
        assert torch.equal(emb(4, {cond.name: value}, {cond.name: torch.zeros(4, dtype=torch.bool)}), emb(4))


def test_several_properties_sum():
    together = _embedding()
    out = together(4, _values(), _masks())
    expected = torch.zeros(4, HIDDEN)
    for cond in ALL_KINDS:
        alone = ConditionEmbedding([cond], HIDDEN).eval()
        alone.embeddings[cond.name].load_state_dict(together.embeddings[cond.name].state_dict())
        alone.null_tokens[cond.name].data.copy_(together.null_tokens[cond.name])
        expected += alone(4, {cond.name: _values()[cond.name]}, {cond.name: _masks()[cond.name]})
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_condition_dropout_only_in_training_and_reproducible_from_the_rng():
    emb = _embedding(dropout=1.0)
    values, masks = _values(), _masks()
    assert not torch.allclose(emb.eval()(4, values, masks), emb(4))
    assert torch.equal(emb.train()(4, values, masks), emb.eval()(4))  # p = 1: everything null

    half = _embedding(ALL_KINDS[:1], dropout=0.5).train()
    b = 256
    value = {"band_gap": torch.linspace(0.1, 5.0, b)}
    torch.manual_seed(11)
    first = half(b, value)
    torch.manual_seed(11)
    assert torch.equal(half(b, value), first)  # same global RNG state, same drops
    is_null = (first == half.null_tokens["band_gap"]).all(dim=1)
    assert 0.35 < is_null.float().mean() < 0.65


def test_scalar_normalisation_is_applied():
    torch.manual_seed(0)
    emb = ScalarEmbedding(HIDDEN)
    x = torch.tensor([100.0, 250.0, 400.0])
    raw = emb((x - 250.0) / 75.0)
    emb.set_normalization(250.0, 75.0)
    torch.testing.assert_close(emb(x), raw)
    with pytest.raises(ValueError, match="std must be positive"):
        emb.set_normalization(0.0, 0.0)
    # through the combined module, and saved with the state dict
    combined = _embedding()
    combined.set_normalization("band_gap", 1.5, 2.0)
    assert combined.state_dict()["embeddings.band_gap.mean"] == 1.5
    assert combined.state_dict()["embeddings.band_gap.std"] == 2.0
    with pytest.raises(ValueError, match="not a configured scalar"):
        combined.set_normalization("space_group", 0.0, 1.0)


def test_invalid_inputs_are_named():
    emb = _embedding()
    with pytest.raises(ValueError, match="space_group"):
        emb(2, {"space_group": torch.tensor([0, 12])})  # 0 is not a space group when present
    with pytest.raises(ValueError, match="magnetic_class"):
        emb(2, {"magnetic_class": torch.tensor([0, 4])})
    with pytest.raises(ValueError, match="chemical_system must be"):
        emb(2, {"chemical_system": torch.zeros(2, 50)})
    with pytest.raises(ValueError, match="not configured"):
        emb(2, {"bulk_modulus": torch.zeros(2)})
    with pytest.raises(ValueError, match="unknown kind"):
        ConditionEmbedding([ConditionConfig(name="x", kind="vector")], HIDDEN)
    with pytest.raises(ValueError, match="num_classes"):
        ConditionEmbedding([ConditionConfig(name="x", kind="categorical")], HIDDEN)
    with pytest.raises(ValueError, match="unique"):
        ConditionEmbedding([ConditionConfig(name="x"), ConditionConfig(name="x")], HIDDEN)
