"""Predictor-corrector sampler: determinism, valid outputs, exactness with the exact denoiser,
ancestral steps against the forward marginals, classifier-free guidance, atom-count prior."""

from __future__ import annotations

import math

import pytest
import torch
from test_diffusion_model import STATS, oracle_model, read_records, tiny_model

from xtalgen.models.coords_process import wrap
from xtalgen.models.diffusion import NoisyCrystals
from xtalgen.models.lattice_process import polar_symmetric
from xtalgen.models.sampler import (
    SAMPLING_EPS_T,
    guided_prediction,
    heun_step,
    predictor_step,
    sample,
    sample_num_atoms,
    time_grid,
)
from xtalgen.models.types_process import MASK_TOKEN
from xtalgen.schema import ConditionConfig

GAP = ConditionConfig(name="dft_band_gap", kind="scalar")


@pytest.fixture(scope="module")
def perov_record(perov_val):
    return read_records(perov_val, 1)[0]


def _sample(model, seed: int, **kwargs):
    return sample(model, torch.tensor([5, 3, 4]), num_steps=2, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_same_generator_same_structures_and_valid_outputs():
    model = tiny_model(conditions=[GAP])
    first = _sample(model, 0, guidance_scale=2.0, conditions={"dft_band_gap": 3.0})
    second = _sample(model, 0, guidance_scale=2.0, conditions={"dft_band_gap": 3.0})
    other = _sample(model, 1, guidance_scale=2.0, conditions={"dft_band_gap": 3.0})
    for name in ("lattice", "frac_coords", "atomic_numbers"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.frac_coords, other.frac_coords)

    assert first.num_atoms.tolist() == [5, 3, 4]
    assert first.batch_index.tolist() == [0] * 5 + [1] * 3 + [2] * 4
    assert first.frac_coords.shape == (12, 3) and first.lattice.shape == (3, 3, 3)
    assert ((first.frac_coords >= 0) & (first.frac_coords < 1)).all()
    assert ((first.atomic_numbers >= 1) & (first.atomic_numbers <= 100)).all()
    assert torch.equal(first.lattice, first.lattice.transpose(1, 2))
    assert torch.isfinite(first.lattice).all()
    assert first.properties["dft_band_gap"].tolist() == [3.0, 3.0, 3.0]
    assert first.property_mask["dft_band_gap"].all()
    assert model.training  # restored after sampling


def test_unknown_condition_is_refused():
    with pytest.raises(ValueError, match="not conditioned on 'hhi_score'"):
        _sample(tiny_model(conditions=[GAP]), 0, conditions={"hhi_score": 1000.0})


@pytest.mark.parametrize("eta, time_power, corrector_steps, predictor", [
    (1.0, 1.0, 1, "ancestral"), (0.0, 2.0, 0, "ancestral"), (0.5, 3.0, 1, "ancestral"),
    (1.0, 1.0, 0, "heun"), (1.0, 2.0, 1, "heun"),
])
def test_exact_denoiser_recovers_the_crystal(perov_record, eta, time_power, corrector_steps, predictor):
    """With the exact score of a one-crystal data set every sample is that crystal, on any grid."""
    model = oracle_model(perov_record)
    num_atoms = torch.full((6,), perov_record.num_atoms)
    out = sample(model, num_atoms, num_steps=30, generator=torch.Generator().manual_seed(2), eta=eta,
                 time_power=time_power, corrector_steps=corrector_steps, predictor=predictor)
    reference_lattice = polar_symmetric(torch.as_tensor(perov_record.lattice)[None])[0]
    assert torch.equal(out.atomic_numbers, torch.as_tensor(perov_record.atomic_numbers).repeat(6))
    frac_error = out.frac_coords - torch.as_tensor(perov_record.frac_coords).repeat(6, 1)
    assert (frac_error - torch.round(frac_error)).abs().max() < 1e-8
    assert (out.lattice - reference_lattice).abs().max() < 1e-8


def _copies(record, count: int):
    """`count` copies of one crystal as flat batch tensors: num_atoms (B,), batch_index (N,), types
    (N,), fractional coordinates (N, 3), symmetric lattices (B, 3, 3)."""
    num_atoms = torch.full((count,), record.num_atoms)
    batch_index = torch.repeat_interleave(torch.arange(count), num_atoms)
    types = torch.as_tensor(record.atomic_numbers).repeat(count)
    frac = torch.as_tensor(record.frac_coords).repeat(count, 1)
    lattice = polar_symmetric(torch.as_tensor(record.lattice)[None]).expand(count, 3, 3)
    return num_atoms, batch_index, types, frac, lattice


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_ancestral_step_reproduces_the_forward_marginal(perov_record, eta):
    """x_t ~ q(x_t | x_0) stepped with the exact score to s must be distributed as q(x_s | x_0):
    for the ancestral step (eta = 1) and for every member of the DDIM family (eta < 1)."""
    model = oracle_model(perov_record)
    generator = torch.Generator().manual_seed(3)
    num_structures, n0 = 8000, perov_record.num_atoms
    num_atoms, batch_index, x0_types, x0_frac, x0_lattice = _copies(perov_record, num_structures)

    # sigma_t ~ 0.1: the posterior on the torus is Gaussian to exp(-0.5^2 / (2 sigma_t^2)) ~ 1e-6
    t_value, s_value = 0.45, 0.3
    t = torch.full((num_structures,), t_value, dtype=torch.float64)
    s = torch.full_like(t, s_value)
    sigma_t = model.coords.sigma(t[batch_index], num_atoms[batch_index])
    x_t = NoisyCrystals(
        model.types.sample_marginal(x0_types, model.types.level(t[batch_index]), generator),
        model.coords.sample_marginal(x0_frac, sigma_t, generator),
        model.lattice.sample_marginal(x0_lattice, t, num_atoms, generator)[0],
        num_atoms,
        batch_index,
    )
    x_s = predictor_step(model, x_t, model.predict(x_t, t), t, s, False, generator, eta)

    p_mask = model.types.mask_probability(model.types.level(s[:1])).item()
    masked = (x_s.atomic_numbers == MASK_TOKEN).double().mean().item()
    assert abs(masked - p_mask) < 5 * math.sqrt(p_mask * (1 - p_mask) / len(x0_types))
    unmasked = x_s.atomic_numbers != MASK_TOKEN
    assert torch.equal(x_s.atomic_numbers[unmasked], x0_types[unmasked])

    sigma_s = model.coords.sigma(torch.tensor(s_value, dtype=torch.float64), torch.tensor(float(n0))).item()
    d = x_s.frac_coords - x0_frac
    tol = 5 / math.sqrt(d.numel())
    assert abs(torch.cos(2 * math.pi * d).mean().item() - math.exp(-2 * math.pi**2 * sigma_s**2)) < tol
    assert abs(torch.sin(2 * math.pi * d).mean().item()) < tol
    assert abs((d - torch.round(d)).var().item() / sigma_s**2 - 1) < 0.03

    mean = model.lattice.marginal_mean(x0_lattice[:1], s[:1], num_atoms[:1])[0]
    var = model.lattice.std(s[:1], num_atoms[:1]).item() ** 2
    assert (x_s.lattice.mean(0) - mean).abs().max() < 5 * math.sqrt(var / num_structures)
    assert (x_s.lattice.var(0) / var - 1).abs().max() < 0.06


def test_heun_step_follows_the_exact_probability_flow(perov_record):
    """For a one-crystal data set the ODE solution is known: the noise that moved a state from the
    crystal stays the same as sigma shrinks, x_s = x_0 + sigma_s / sigma_t (x_t - x_0), and the lattice
    keeps its standardised deviation, L_s = m_s + std_s / std_t (L_t - m_t) with m the marginal mean.
    Heun's step with the exact score must land there; it re-evaluates the score at t_next, so a
    second evaluation at the wrong time or state would miss."""
    model = oracle_model(perov_record)
    generator = torch.Generator().manual_seed(5)
    count = 16
    num_atoms, batch_index, x0_types, x0_frac, x0_lattice = _copies(perov_record, count)
    t = torch.full((count,), 0.35, dtype=torch.float64)  # sigma ~ 0.05: Gaussian on the torus to 1e-40
    s = torch.full_like(t, 0.2)
    sigma_t = model.coords.sigma(t[batch_index], num_atoms[batch_index])
    x_t = NoisyCrystals(x0_types, model.coords.sample_marginal(x0_frac, sigma_t, generator),
                        model.lattice.sample_marginal(x0_lattice, t, num_atoms, generator)[0], num_atoms, batch_index)
    calls = []

    def predict(state, time):
        calls.append(time[0].item())
        return model.predict(state, time)

    x_s = heun_step(model, x_t, model.predict(x_t, t), t, s, False, generator, predict)
    assert calls == [0.2]
    sigma_s = model.coords.sigma(s[batch_index], num_atoms[batch_index])
    moved = x_t.frac_coords - x0_frac
    expected = x0_frac + (sigma_s / sigma_t)[:, None] * (moved - torch.round(moved))
    error = x_s.frac_coords - expected
    assert (error - torch.round(error)).abs().max() < 1e-10
    mean_t = model.lattice.marginal_mean(x0_lattice, t, num_atoms)
    mean_s = model.lattice.marginal_mean(x0_lattice, s, num_atoms)
    ratio = (model.lattice.std(s, num_atoms) / model.lattice.std(t, num_atoms))[:, None, None]
    assert (x_s.lattice - (mean_s + ratio * (x_t.lattice - mean_t))).abs().max() < 1e-10
    assert torch.equal(x_s.atomic_numbers, x0_types)


def test_time_grid_runs_from_one_to_eps_and_crowds_near_zero_with_power():
    uniform = time_grid(50)
    assert uniform == torch.linspace(1.0, SAMPLING_EPS_T, 50, dtype=torch.float64).tolist()
    for power in (2.0, 3.0):
        grid = time_grid(50, power)
        assert grid[0] == 1.0 and abs(grid[-1] - SAMPLING_EPS_T) < 1e-15
        assert all(a > b for a, b in zip(grid, grid[1:]))
        assert sum(t < 0.2 for t in grid) > sum(t < 0.2 for t in uniform)
    assert time_grid(1) == [1.0]


def test_predictor_eta_out_of_range_is_refused():
    with pytest.raises(ValueError, match="eta must be in"):
        _sample(tiny_model(), 0, eta=1.5)
    with pytest.raises(ValueError, match="predictor must be one of"):
        _sample(tiny_model(), 0, predictor="euler")


def test_guidance_combines_conditional_and_unconditional_outputs():
    model = tiny_model(conditions=[GAP]).eval()
    generator = torch.Generator().manual_seed(4)
    num_atoms = torch.tensor([4, 6])
    batch_index = torch.repeat_interleave(torch.arange(2), num_atoms)
    x = NoisyCrystals(
        torch.randint(0, 101, (10,), generator=generator),
        torch.rand(10, 3, generator=generator, dtype=torch.float64),
        model.lattice.prior(num_atoms, generator=generator, dtype=torch.float64),
        num_atoms,
        batch_index,
    )
    t = torch.tensor([0.7, 0.3], dtype=torch.float64)
    conditions = {"dft_band_gap": torch.tensor([1.0, 4.0], dtype=torch.float64)}
    present = {"dft_band_gap": torch.ones(2, dtype=torch.bool)}
    cond = model.predict(x, t, conditions, present)
    uncond = model.predict(x, t, conditions, {"dft_band_gap": torch.zeros(2, dtype=torch.bool)})
    assert not torch.allclose(cond.coords, uncond.coords)  # the condition does matter

    for gamma, expected in ((1.0, cond), (0.0, uncond)):
        doubled = guided_prediction(model, x, t, conditions, gamma, single_pass_shortcuts=False)
        for name in ("type_logits", "coords", "lattice"):
            torch.testing.assert_close(getattr(doubled, name), getattr(expected, name), rtol=1e-10, atol=1e-10)
    guided = guided_prediction(model, x, t, conditions, 2.0)
    for name in ("type_logits", "coords", "lattice"):
        expected = 2 * getattr(cond, name) - getattr(uncond, name)
        torch.testing.assert_close(getattr(guided, name), expected, rtol=1e-9, atol=1e-9)


def test_guidance_one_samples_like_conditional_only():
    model = tiny_model(conditions=[GAP])
    conditional = _sample(model, 5, guidance_scale=1.0, conditions={"dft_band_gap": 2.0})
    # the same request through the two-pass path of a guidance scale that is 1 only numerically
    two_pass = _sample(model, 5, guidance_scale=1.0 + 1e-12, conditions={"dft_band_gap": 2.0})
    assert torch.equal(conditional.atomic_numbers, two_pass.atomic_numbers)
    torch.testing.assert_close(conditional.frac_coords, two_pass.frac_coords, rtol=0, atol=1e-8)
    torch.testing.assert_close(conditional.lattice, two_pass.lattice, rtol=1e-8, atol=1e-8)


def test_sample_num_atoms_follows_the_histogram():
    stats = {"num_atoms_histogram": {"4": 1, "8": 3, "12": 0}}
    draws = sample_num_atoms(stats, 20_000, torch.Generator().manual_seed(6))
    assert set(draws.unique().tolist()) == {4, 8}
    assert abs((draws == 8).double().mean().item() - 0.75) < 0.015
    again = sample_num_atoms(stats, 20_000, torch.Generator().manual_seed(6))
    assert torch.equal(draws, again)
    assert sample_num_atoms(STATS, 5, torch.Generator().manual_seed(0)).dtype == torch.long
    with pytest.raises(ValueError, match="num_atoms_histogram"):
        sample_num_atoms({"mean_density": 0.05}, 3)


def test_wrap_puts_coordinates_outside_the_cell_into_it():
    x = torch.tensor([[-0.25, 1.0, 3.75], [-1e-18, -2.0, 0.5], [1.999999, -0.0, -7.125]], dtype=torch.float64)
    expected = torch.tensor([[0.75, 0.0, 0.75], [0.0, 0.0, 0.5], [0.999999, 0.0, 0.875]], dtype=torch.float64)
    wrapped = wrap(x)
    torch.testing.assert_close(wrapped, expected, rtol=0, atol=1e-12)
    assert bool(((wrapped >= 0) & (wrapped < 1)).all())  # -1e-18 % 1 rounds to 1.0: it must become 0
    shift = wrapped - x  # a whole number of cells, never a move inside the cell
    torch.testing.assert_close(shift, shift.round(), rtol=0, atol=1e-12)
    assert torch.equal(wrap(wrapped), wrapped)
    x32 = torch.tensor([-1e-9, 1.0 - 2**-25, 5.5], dtype=torch.float32)
    w32 = wrap(x32)
    assert bool(((w32 >= 0) & (w32 < 1)).all()), w32
