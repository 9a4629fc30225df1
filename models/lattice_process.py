"""Lattice: variance-preserving (Ornstein-Uhlenbeck) diffusion toward a per-size limit distribution.

dL = -1/2 beta(t) (L - mu_N) dt + sqrt(beta(t) v_N) dW with beta(t) = beta_min + t (beta_max - beta_min)
(0.1 -> 20, MatterGen). The limit for a structure of N atoms is a cube at the training mean atomic
density rho with per-entry noise that scales with the cell edge:

    mu_N = (N / rho)^(1/3) I,        v_N = 0.25 N^(2/3)          (per entry)

Closed-form marginal: L_t = a(t) L_0 + (1 - a(t)) mu_N + sqrt((1 - a(t)^2) v_N) z, with
a(t) = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2).

Lattices are kept symmetric. The clean lattice is replaced by the symmetric factor of its left polar
decomposition, P = (L L^T)^(1/2) = L Q^T with Q orthogonal: the same crystal (same metric L L^T,
same fractional coordinates) seen in a rotated frame, and independent of the frame the data came
in. The noise is symmetric too: off-diagonal (z_ij + z_ji) / sqrt(2) and diagonal z_ii, which keeps
the per-entry variance (MatterGen's `make_noise_symmetric_preserve_variance`).

Loss: the network predicts std * score = -z (MatterGen's "score times std"); squared error averaged
over the 9 entries per structure.
"""

from __future__ import annotations

import math

import torch

from xtalgen.models.coords_process import gaussian

LIMIT_VARIANCE_SCALE = 0.25  # MatterGen's limit_var_scaling_constant


def symmetric_noise(batch_size: int, *, generator, device, dtype) -> torch.Tensor:
    """(B, 3, 3) symmetric Gaussian matrices with unit variance in every entry."""
    z = gaussian((batch_size, 3, 3), generator=generator, device=device, dtype=dtype)
    eye = torch.eye(3, device=device, dtype=dtype)
    return (1 - eye) * (z + z.transpose(1, 2)) / math.sqrt(2.0) + eye * z


def polar_symmetric(lattice: torch.Tensor) -> torch.Tensor:
    """The symmetric positive factor (L L^T)^(1/2) of each (B, 3, 3) lattice (rows = vectors).

    From the SVD L = W S V^T it is W S W^T. For a symmetric input with negative eigenvalues this
    returns |L| (a reflection of the frame): a valid, right-handed lattice of the same crystal.
    """
    w, s, _ = torch.linalg.svd(lattice)
    sym = w @ torch.diag_embed(s) @ w.transpose(1, 2)
    return 0.5 * (sym + sym.transpose(1, 2))  # remove round-off asymmetry


class LatticeVPProcess:
    """Marginals, limit distribution and ancestral-step coefficients of the lattice process."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, density: float = 0.05):
        if not density > 0:
            raise ValueError(f"the lattice prior needs a positive mean density (atoms/Å^3), got {density}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.density = float(density)

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """a(t) = exp(-int_0^t beta / 2)."""
        return torch.exp(-0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)

    def limit_mean(self, num_atoms: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """mu_N = (N / rho)^(1/3) I, shape (B, 3, 3)."""
        edge = (num_atoms.to(dtype) / self.density) ** (1.0 / 3.0)
        return edge[:, None, None] * torch.eye(3, device=num_atoms.device, dtype=dtype)

    def limit_std(self, num_atoms: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """sqrt(v_N) = 0.5 N^(1/3) per entry, shape (B,)."""
        return math.sqrt(LIMIT_VARIANCE_SCALE) * num_atoms.to(dtype) ** (1.0 / 3.0)

    def std(self, t: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        """Marginal per-entry std sqrt((1 - a^2) v_N), shape (B,)."""
        a = self.mean_coeff(t)
        return torch.sqrt(1 - a * a) * self.limit_std(num_atoms, t.dtype)

    def marginal_mean(self, x0: torch.Tensor, t: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
        a = self.mean_coeff(t)[:, None, None]
        return a * x0 + (1 - a) * self.limit_mean(num_atoms, x0.dtype)

    def sample_marginal(
        self, x0: torch.Tensor, t: torch.Tensor, num_atoms: torch.Tensor, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw L_t ~ q(L_t | L_0); returns (L_t, z) with z the symmetric unit noise used."""
        z = symmetric_noise(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
        std = self.std(t, num_atoms)[:, None, None]
        return self.marginal_mean(x0, t, num_atoms) + std * z, z

    def prior(self, num_atoms: torch.Tensor, *, generator, dtype) -> torch.Tensor:
        """A draw from the limit distribution N(mu_N, v_N) with symmetric noise, (B, 3, 3)."""
        z = symmetric_noise(num_atoms.shape[0], generator=generator, device=num_atoms.device, dtype=dtype)
        return self.limit_mean(num_atoms, dtype) + self.limit_std(num_atoms, dtype)[:, None, None] * z
