"""Fractional coordinates: wrapped-normal variance-exploding diffusion on the 3-torus.

Forward process: x_t = wrap(x_0 + sigma(t) z), z ~ N(0, I), wrap = mod 1, with

    sigma(t) = sigma_min^(1-t) * sigma_max^t / N^(1/3)     (0.01 -> 5.0, MatterGen)

where N is the structure's number of atoms: the same t then means about the same displacement in
Å for small and large cells (a cell's edge grows like N^(1/3)). The covariance is isotropic in
fractional space, so the density factorises over the three axes and every formula below is 1-D.

Score target. The 1-D wrapped-normal density of the displacement d = x_t - x_0 is

    p(d) = sum_k N(d + k; 0, sigma^2)                               (images form)
         = 1 + 2 sum_{n>=1} exp(-2 pi^2 n^2 sigma^2) cos(2 pi n d)    (Fourier / theta form)

(Poisson summation). Both converge, but at opposite ends: images fast for small sigma, Fourier fast
for large sigma (sigma reaches 5 for N = 1, where a sum over a few images is badly wrong). We use
images |k| <= K = 4 for sigma <= 0.5 and Fourier terms n <= M = 4 for sigma > 0.5, with d first
reduced to [-0.5, 0.5]. Truncation bounds (relative error of p, hence of the score's weights):

    images:  2.01 exp(-K (K+1) / (2 sigma^2))    <= 8.5e-18 at sigma <= 0.5
    Fourier: 2.03 exp(-2 pi^2 (M+1)^2 sigma^2)  <= 1e-53   at sigma >= 0.5

i.e. the score is exact to float64 round-off everywhere (`truncation_bound` returns these numbers;
a test checks them against a 121-image reference).

Loss (MatterGen's "score times std" target): the network predicts sigma * grad_x log p(x_t | x_0) in
fractional units, per atom, and the loss is the squared error summed over atoms (mean over the
three axes), i.e. sigma^2-weighted denoising score matching.

Mapping from the network: `coord_vectors` are Cartesian and equivariant. They are read as a
Cartesian displacement and mapped to fractional space with the noisy lattice the network saw,
f = v L^{-1} (rows of L are lattice vectors, so cart = frac @ L). Under a rotation R of the frame,
L -> L R^T and v -> v R^T, hence f -> v R^T (L R^T)^{-1} = v L^{-1}: the fractional prediction, and
so the loss, do not depend on the frame (MatterGen maps the same way).
"""

from __future__ import annotations

import math

import torch

IMAGES_K = 4
FOURIER_M = 4
SIGMA_SWITCH = 0.5


def gaussian(shape, *, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """N(0, 1) draws from `generator` (or the global RNG), made on the generator's device."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def wrap(frac: torch.Tensor) -> torch.Tensor:
    """Wrap fractional coordinates into [0, 1) (remainder also maps 1 - tiny rounding to 0)."""
    wrapped = torch.remainder(frac, 1.0)
    return torch.where(wrapped >= 1.0, torch.zeros_like(wrapped), wrapped)


def _score_images(d: torch.Tensor, sigma: torch.Tensor, num_images: int) -> torch.Tensor:
    """d log p / d d from the images sum |k| <= num_images (softmax weights: stable for tiny sigma)."""
    k = torch.arange(-num_images, num_images + 1, device=d.device, dtype=d.dtype)
    shifted = d.unsqueeze(-1) + k  # (..., 2K+1)
    var = (sigma * sigma).unsqueeze(-1)
    weights = torch.softmax(-shifted * shifted / (2 * var), dim=-1)
    return -(weights * shifted).sum(-1) / var.squeeze(-1)


def _score_fourier(d: torch.Tensor, sigma: torch.Tensor, num_terms: int) -> torch.Tensor:
    """d log p / d d from the theta-function form with n <= num_terms."""
    n = torch.arange(1, num_terms + 1, device=d.device, dtype=d.dtype)
    decay = torch.exp(-2 * math.pi**2 * (sigma * sigma).unsqueeze(-1) * n * n)  # (..., M)
    phase = 2 * math.pi * d.unsqueeze(-1) * n
    density = 1 + 2 * (decay * torch.cos(phase)).sum(-1)
    derivative = -4 * math.pi * (decay * n * torch.sin(phase)).sum(-1)
    return derivative / density


def wrapped_normal_score(d: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Score d/dd log p(d) of the 1-D wrapped normal of std `sigma` (elementwise, any shape).

    d: displacement x_t - x_0 in fractional units (any real value); sigma broadcastable to d.
    Exact to round-off: see the module docstring for the truncation bounds.
    """
    sigma = torch.as_tensor(sigma, dtype=d.dtype, device=d.device).expand_as(d)
    d = d - torch.round(d)  # the density has period 1; reduce to [-0.5, 0.5]
    # Evaluate each form only inside its range, so the unused branch cannot produce inf/NaN.
    by_images = _score_images(d, sigma.clamp(max=SIGMA_SWITCH), IMAGES_K)
    by_fourier = _score_fourier(d, sigma.clamp(min=SIGMA_SWITCH), FOURIER_M)
    return torch.where(sigma <= SIGMA_SWITCH, by_images, by_fourier)


def wrapped_normal_log_density(d: torch.Tensor, sigma: float, num_images: int = 60) -> torch.Tensor:
    """log p(d) by a long images sum (reference for tests; accurate for sigma < num_images / 8)."""
    k = torch.arange(-num_images, num_images + 1, device=d.device, dtype=d.dtype)
    shifted = d.unsqueeze(-1) + k
    log_terms = -shifted * shifted / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2)
    return torch.logsumexp(log_terms, dim=-1)


def truncation_bound(
    sigma: float, num_images: int = IMAGES_K, num_terms: int = FOURIER_M, form: str | None = None
) -> float:
    """Bound on the relative truncation error of the density (form: "images", "fourier", or
    None = the form `wrapped_normal_score` uses at this sigma).

    Images |k| <= K, |d| <= 1/2: the dropped terms over the nearest one are at most
    2 sum_{j>K} exp(-j (j-1) / (2 sigma^2)) <= 2 e^{-K(K+1)/(2 sigma^2)} / (1 - e^{-(K+1)/sigma^2}).
    Fourier n <= M with q = e^{-2 pi^2 sigma^2}: dropped terms are at most 2 q^{(M+1)^2} / (1 - q^{2M+3})
    and the density is at least 1 - 2q / (1 - q^3).
    """
    form = form or ("images" if sigma <= SIGMA_SWITCH else "fourier")
    if form == "images":
        k = num_images
        return 2 * math.exp(-k * (k + 1) / (2 * sigma**2)) / (1 - math.exp(-(k + 1) / sigma**2))
    q = math.exp(-2 * math.pi**2 * sigma**2)
    m = num_terms
    floor = 1 - 2 * q / (1 - q**3)
    return 2 * q ** ((m + 1) ** 2) / (1 - q ** (2 * m + 3)) / floor


def cartesian_to_fractional(vectors: torch.Tensor, lattice: torch.Tensor, batch_index: torch.Tensor):
    """Map Cartesian displacements (N, 3) to fractional ones with each atom's lattice: v L^{-1}."""
    inverse = torch.linalg.inv(lattice)[batch_index]  # (N, 3, 3)
    return torch.einsum("ni,nij->nj", vectors, inverse)


class WrappedNormalCoordProcess:
    """sigma(t), marginal draws, the score target and the prior of the coordinate process."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 5.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def sigma(self, t: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        """Per-entry std sigma_min^(1-t) sigma_max^t / N^(1/3); t and num_atoms broadcast."""
        log_sigma = (1 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max)
        return torch.exp(log_sigma) / num_atoms.to(t.dtype) ** (1.0 / 3.0)

    def sample_marginal(
        self, x0: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_t = wrap(x_0 + sigma z). x0: (N, 3); sigma: (N,) per atom."""
        z = gaussian(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return wrap(x0 + sigma.unsqueeze(-1) * z)

    def score_times_sigma(self, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The training target sigma * grad log p(x_t | x_0), (N, 3) in fractional units."""
        sigma = sigma.unsqueeze(-1).expand_as(x_t)
        return sigma * wrapped_normal_score(x_t - x0, sigma)

    def prior(self, num_atoms_total: int, *, generator, device, dtype) -> torch.Tensor:
        """At t = 1 the wrapped normal is uniform on the torus to within exp(-2 pi^2 sigma^2)."""
        if generator is None:
            return torch.rand((num_atoms_total, 3), device=device, dtype=dtype)
        u = torch.rand((num_atoms_total, 3), generator=generator, device=generator.device, dtype=dtype)
        return u.to(device)
