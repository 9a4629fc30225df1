"""The three corruption processes against their closed forms (float64 throughout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xtalgen.models.coords_process import (
    FOURIER_M,
    IMAGES_K,
    SIGMA_SWITCH,
    WrappedNormalCoordProcess,
    _score_images,
    cartesian_to_fractional,
    truncation_bound,
    wrap,
    wrapped_normal_log_density,
    wrapped_normal_score,
)
from xtalgen.models.lattice_process import LatticeVPProcess, polar_symmetric, symmetric_noise
from xtalgen.models.types_process import MASK_TOKEN, AbsorbingTypeProcess


def _random_rotation(generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


# --- atom types: absorbing-state D3PM ------------------------------------------------------------


def _transition_matrix(num_levels: int, k: int, dim: int = 101) -> torch.Tensor:
    """Explicit Q_k[i, j] = q(x_k = j | x_{k-1} = i) over tokens 0 (mask) .. 100."""
    beta = 1.0 / (num_levels - k + 1)
    q = (1 - beta) * torch.eye(dim, dtype=torch.float64)
    q[:, MASK_TOKEN] += beta
    q[MASK_TOKEN] = 0.0
    q[MASK_TOKEN, MASK_TOKEN] = 1.0
    return q


def test_type_schedule_telescopes_to_linear_mask_rate():
    n = 1000
    process = AbsorbingTypeProcess(n)
    levels = torch.arange(1, n + 1)
    keep = torch.cumprod(1 - process.step_mask_probability(levels), dim=0)  # alpha_bar_k, k = 1..N
    torch.testing.assert_close(1 - keep, process.mask_probability(levels), atol=1e-12, rtol=0)
    assert process.mask_probability(torch.tensor([n])).item() == 1.0


def test_type_marginal_equals_product_of_transition_matrices():
    n = 12
    process = AbsorbingTypeProcess(n)
    cumulative = torch.eye(101, dtype=torch.float64)
    for k in range(1, n + 1):
        cumulative = cumulative @ _transition_matrix(n, k)
        p_mask = process.mask_probability(torch.tensor(k)).item()
        for z in (1, 26, 100):
            assert cumulative[z, MASK_TOKEN].item() == pytest.approx(p_mask, abs=1e-12)
            assert cumulative[z, z].item() == pytest.approx(1 - p_mask, abs=1e-12)


def test_type_level_mapping_covers_all_levels():
    process = AbsorbingTypeProcess(1000)
    assert process.level(torch.tensor([0.0, 1e-5, 1.0])).tolist() == [1, 1, 1000]
    # MatterGen's sampling grid linspace(1, 1/N, N) visits levels N, N-1, ..., 1 exactly once.
    grid = torch.linspace(1.0, 1e-3, 1000, dtype=torch.float64)
    assert process.level(grid).tolist() == list(range(1000, 0, -1))


def test_type_forward_mask_fraction_matches_closed_form():
    process = AbsorbingTypeProcess(1000)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(1, 101, (200_000,), generator=generator)
    for t in (0.05, 0.5, 0.93):
        level = process.level(torch.full_like(x0, 0, dtype=torch.float64) + t)
        x_t = process.sample_marginal(x0, level, generator)
        p = process.mask_probability(level[:1]).item()
        frac = (x_t == MASK_TOKEN).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / len(x0))
        kept = x_t != MASK_TOKEN
        assert torch.equal(x_t[kept], x0[kept])  # unmasked atoms keep their element


def test_type_variational_bound_equals_explicit_kl_of_posteriors():
    """L_vb = CE / k on masked atoms: check against Bayes' rule with explicit matrices."""
    n = 10
    process = AbsorbingTypeProcess(n)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 100, generator=generator, dtype=torch.float64)
    x0 = torch.randint(1, 101, (6,), generator=generator)
    p_x0 = torch.cat([torch.zeros(6, 1, dtype=torch.float64), logits.softmax(-1)], dim=1)  # (6, 101)
    for k in range(1, n + 1):
        cum_prev = torch.eye(101, dtype=torch.float64)
        for j in range(1, k):
            cum_prev = cum_prev @ _transition_matrix(n, j)
        step = _transition_matrix(n, k)
        # q(x_{k-1} | x_k = mask, x0) ∝ q(x_k = mask | x_{k-1}) q(x_{k-1} | x0)
        unnorm = cum_prev * step[:, MASK_TOKEN][None, :]  # (x0, x_{k-1})
        posterior = unnorm / unnorm.sum(-1, keepdim=True)
        q = posterior[x0]  # (6, 101)
        p = p_x0 @ posterior  # model's reverse kernel: sum_x0 q(. | x_k, x0) p(x0 | x_k)
        kl = (q * (torch.log(q.clamp_min(1e-300)) - torch.log(p.clamp_min(1e-300)))).sum(-1)
        masked = torch.zeros_like(x0)
        level = torch.full_like(x0, k)
        vb_only = process.loss_per_atom(x0, masked, logits, level, vb_weight=1.0)
        ce_only = process.loss_per_atom(x0, masked, logits, level, vb_weight=0.0)
        torch.testing.assert_close(vb_only - ce_only, kl, rtol=1e-10, atol=1e-12)
        # and the reverse step's unmask probability is that posterior's mass off the mask
        unmask = 1 - posterior[1, MASK_TOKEN]
        assert process.unmask_probability(torch.tensor(k), torch.tensor(k - 1)).item() == pytest.approx(
            unmask.item(), abs=1e-12
        )


def test_type_loss_is_zero_on_unmasked_atoms_and_hybrid_on_masked():
    process = AbsorbingTypeProcess(1000)
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 100, generator=generator, dtype=torch.float64)
    x0 = torch.tensor([3, 8, 26, 100])
    x_t = torch.tensor([3, MASK_TOKEN, 26, MASK_TOKEN])
    level = torch.tensor([10, 10, 500, 500])
    loss = process.loss_per_atom(x0, x_t, logits, level, vb_weight=0.01)
    ce = torch.nn.functional.cross_entropy(logits, x0 - 1, reduction="none")
    assert loss[0] == 0 and loss[2] == 0
    torch.testing.assert_close(loss[1], ce[1] * (1 + 0.01 / 10))
    torch.testing.assert_close(loss[3], ce[3] * (1 + 0.01 / 500))


def test_type_reverse_step_unmask_rate_and_element_distribution():
    process = AbsorbingTypeProcess(1000)
    generator = torch.Generator().manual_seed(3)
    num = 40_000
    x_t = torch.zeros(num, dtype=torch.long)
    x_t[:10] = torch.arange(1, 11)  # a few already-unmasked atoms must stay as they are
    logits = torch.full((num, 100), -30.0, dtype=torch.float64)
    logits[:, 5], logits[:, 7] = 0.0, math.log(3.0)  # p(Z=6) = 1/4, p(Z=8) = 3/4
    k_from, k_to = torch.full((num,), 400), torch.full((num,), 300)
    x_next = process.reverse_step(x_t, logits, k_from, k_to, generator)
    assert torch.equal(x_next[:10], torch.arange(1, 11))
    revealed = x_next[10:] != MASK_TOKEN
    assert abs(revealed.double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / num)
    carbon_share = (x_next[10:][revealed] == 6).double().mean().item()
    assert abs(carbon_share - 0.25) < 0.02
    assert set(x_next[10:][revealed].unique().tolist()) <= {6, 8}
    # the last step reveals everything
    final = process.reverse_step(x_t, logits, k_from, torch.zeros_like(k_to), generator)
    assert (final != MASK_TOKEN).all()


# --- fractional coordinates: wrapped normal ------------------------------------------------------


def test_coord_sigma_schedule_and_size_scaling():
    process = WrappedNormalCoordProcess(0.01, 5.0)
    n = torch.tensor([1, 8, 27], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    expected = torch.tensor([0.01, 5.0 / 2, math.sqrt(0.05) / 3], dtype=torch.float64)
    torch.testing.assert_close(process.sigma(t, n), expected, rtol=1e-12, atol=0)


def test_coord_marginal_moments_match_wrapped_normal():
    """E[cos 2π d] = exp(-2π²σ²) and E[sin 2π d] = 0 for a wrapped normal, at any σ."""
    process = WrappedNormalCoordProcess()
    generator = torch.Generator().manual_seed(4)
    num = 100_000
    x0 = torch.rand(num, 3, generator=generator, dtype=torch.float64)
    for sigma_value in (0.03, 0.15, 0.4):
        sigma = torch.full((num,), sigma_value, dtype=torch.float64)
        x_t = process.sample_marginal(x0, sigma, generator)
        assert ((x_t >= 0) & (x_t < 1)).all()
        d = x_t - x0
        tol = 5 / math.sqrt(3 * num)
        assert abs(torch.cos(2 * math.pi * d).mean().item() - math.exp(-2 * math.pi**2 * sigma_value**2)) < tol
        assert abs(torch.sin(2 * math.pi * d).mean().item()) < tol
        if sigma_value < 0.1:  # no wrapping in practice: plain Gaussian moments
            d = d - torch.round(d)
            assert abs(d.var().item() / sigma_value**2 - 1) < 0.02


SIGMAS = [0.002, 0.02, 0.1, 0.3, SIGMA_SWITCH, 0.5001, 0.8, 1.5, 3.0, 5.0]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_wrapped_normal_score_is_derivative_of_log_density(sigma):
    d = torch.linspace(-1.3, 1.3, 157, dtype=torch.float64)  # beyond one period on purpose
    h = 1e-5 * min(sigma, 1.0)
    numeric = (wrapped_normal_log_density(d + h, sigma, 200) - wrapped_normal_log_density(d - h, sigma, 200)) / (
        2 * h
    )
    analytic = wrapped_normal_score(d, torch.tensor(sigma, dtype=torch.float64))
    scale = 1.0 / sigma  # typical score magnitude
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8 * scale)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_wrapped_normal_score_exact_against_long_image_sum(sigma):
    d = torch.linspace(-0.5, 0.5, 101, dtype=torch.float64)
    reference = _score_images(d, torch.full_like(d, sigma), 200)
    ours = wrapped_normal_score(d, torch.tensor(sigma, dtype=torch.float64))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def _density_images(d, sigma, num_images):
    k = torch.arange(-num_images, num_images + 1, dtype=torch.float64)
    return torch.exp(-((d[:, None] + k) ** 2) / (2 * sigma**2)).sum(-1) / math.sqrt(2 * math.pi * sigma**2)


def _density_fourier(d, sigma, num_terms):
    n = torch.arange(1, num_terms + 1, dtype=torch.float64)
    return 1 + 2 * (torch.exp(-2 * math.pi**2 * sigma**2 * n**2) * torch.cos(2 * math.pi * d[:, None] * n)).sum(-1)


def test_truncation_bounds_hold_and_are_tight():
    """The stated bounds hold for short sums where the error is measurable (not round-off)."""
    d = torch.linspace(-0.5, 0.5, 201, dtype=torch.float64)
    worst_ratio = 0.0
    for sigma in (0.2, 0.3, 0.4, 0.5):
        exact = _density_images(d, sigma, 200)
        for k in (1, 2):
            err = ((_density_images(d, sigma, k) - exact).abs() / exact).max().item()
            bound = truncation_bound(sigma, num_images=k, form="images")
            assert err <= bound + 1e-15  # plus float64 round-off
            worst_ratio = max(worst_ratio, err / bound)
    for sigma in (0.3, 0.5, 0.8):
        exact = _density_images(d, sigma, 200)
        for m in (1, 2):
            err = ((_density_fourier(d, sigma, m) - exact).abs() / exact).max().item()
            bound = truncation_bound(sigma, num_terms=m, form="fourier")
            assert err <= bound + 1e-15
            worst_ratio = max(worst_ratio, err / bound)
    assert worst_ratio > 0.1  # the bound is not vacuous
    # at the switch both production sums are below float64 resolution
    assert truncation_bound(SIGMA_SWITCH) < 1e-17 and truncation_bound(SIGMA_SWITCH + 1e-9) < 1e-17
    assert IMAGES_K == 4 and FOURIER_M == 4


def test_cartesian_to_fractional_is_frame_invariant():
    generator = torch.Generator().manual_seed(5)
    lattice = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64) + 4 * torch.eye(3, dtype=torch.float64)
    vectors = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    batch_index = torch.tensor([0, 0, 1, 1, 1])
    rotation = _random_rotation(generator)
    frac = cartesian_to_fractional(vectors, lattice, batch_index)
    rotated = cartesian_to_fractional(vectors @ rotation.T, lattice @ rotation.T, batch_index)
    torch.testing.assert_close(frac, rotated, rtol=1e-12, atol=1e-12)
    # and it inverts frac -> cart
    torch.testing.assert_close(torch.einsum("ni,nij->nj", frac, lattice[batch_index]), vectors)


def test_wrap_stays_in_unit_interval():
    x = torch.tensor([-1e-18, -0.25, 1.0, 2.75, 0.999999999999], dtype=torch.float64)
    w = wrap(x)
    assert ((w >= 0) & (w < 1)).all()
    torch.testing.assert_close(w, torch.tensor([0.0, 0.75, 0.0, 0.75, 0.999999999999], dtype=torch.float64))
    assert (wrap(torch.tensor([-1e-9], dtype=torch.float32)) < 1).all()


# --- lattice: VP toward the size-dependent limit ----------------------------------------------


def test_lattice_mean_coefficient_integrates_beta():
    process = LatticeVPProcess(0.1, 20.0, density=0.05)
    for t in (0.1, 0.5, 1.0):
        s = np.linspace(0, t, 20001)
        integral = np.trapezoid(0.1 + s * 19.9, s)
        assert process.mean_coeff(torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(
            math.exp(-0.5 * integral), rel=1e-9
        )


def test_lattice_marginal_mean_and_variance():
    process = LatticeVPProcess(0.1, 20.0, density=0.0577)
    generator = torch.Generator().manual_seed(6)
    num = 40_000
    x0 = torch.tensor([[5.0, 0.3, -0.2], [0.3, 6.0, 0.1], [-0.2, 0.1, 7.0]], dtype=torch.float64).expand(num, 3, 3)
    num_atoms = torch.full((num,), 12)
    for t_value in (0.2, 0.6):
        t = torch.full((num,), t_value, dtype=torch.float64)
        x_t, z = process.sample_marginal(x0, t, num_atoms, generator)
        assert torch.equal(x_t, x_t.transpose(1, 2)) and torch.equal(z, z.transpose(1, 2))
        a = process.mean_coeff(torch.tensor(t_value, dtype=torch.float64))
        mean = a * x0[0] + (1 - a) * (12 / 0.0577) ** (1 / 3) * torch.eye(3, dtype=torch.float64)
        var = (1 - a**2) * 0.25 * 12 ** (2 / 3)
        std_err = math.sqrt(var / num)
        assert (x_t.mean(0) - mean).abs().max() < 5 * std_err
        assert ((x_t.var(0) / var) - 1).abs().max() < 0.04


def test_lattice_prior_density_equals_manifest_density():
    rho = 0.0577
    process = LatticeVPProcess(0.1, 20.0, density=rho)
    generator = torch.Generator().manual_seed(7)
    for n in (1, 5, 20):
        num_atoms = torch.full((30_000,), n)
        prior = process.prior(num_atoms, generator=generator, dtype=torch.float64)
        assert torch.equal(prior, prior.transpose(1, 2))
        mean = prior.mean(0)
        assert n / torch.det(process.limit_mean(num_atoms[:1])[0]).item() == pytest.approx(rho, rel=1e-12)
        assert n / torch.det(mean).item() == pytest.approx(rho, rel=0.01)
        entry_var = 0.25 * n ** (2 / 3)
        assert (prior.var(0) / entry_var - 1).abs().max() < 0.05  # diagonal and off-diagonal alike


def test_symmetric_noise_has_unit_variance_per_entry():
    z = symmetric_noise(100_000, generator=torch.Generator().manual_seed(8), device="cpu", dtype=torch.float64)
    assert torch.equal(z, z.transpose(1, 2))
    assert (z.var(0) - 1).abs().max() < 0.03
    assert z.mean(0).abs().max() < 0.02


def test_polar_symmetric_keeps_the_crystal_and_forgets_the_frame():
    generator = torch.Generator().manual_seed(9)
    lattice = torch.randn(4, 3, 3, generator=generator, dtype=torch.float64) + 5 * torch.eye(3, dtype=torch.float64)
    sym = polar_symmetric(lattice)
    assert torch.equal(sym, sym.transpose(1, 2))
    assert (torch.linalg.eigvalsh(sym) > 0).all()
    # same metric tensor: same lengths and angles, same fractional coordinates
    torch.testing.assert_close(sym @ sym.transpose(1, 2), lattice @ lattice.transpose(1, 2))
    rotation = _random_rotation(generator)
    torch.testing.assert_close(polar_symmetric(lattice @ rotation.T), sym, rtol=1e-10, atol=1e-10)
