"""Building blocks of the score network: embeddings, radial basis, PaiNN-style equivariant layers.

Feature convention: scalars `s` (N, H) are rotation-invariant; vectors `v` (N, 3, H) rotate with
the Cartesian frame (H channels of 3-vectors). Every operation on `v` is linear in `v` along the
channel axis, or multiplies it by invariants, so equivariance holds by construction.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from xtalgen.models.graph import message_passing


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


def sinusoidal_features(x: Tensor, dim: int, min_wavelength: float, max_wavelength: float) -> Tensor:
    """(..., ) -> (..., dim): sin/cos of x at `dim // 2` geometrically spaced wavelengths."""
    half = dim // 2
    wavelengths = torch.logspace(
        math.log10(min_wavelength), math.log10(max_wavelength), half, device=x.device, dtype=x.dtype
    )
    angles = x[..., None] * (2 * math.pi / wavelengths)  # (..., half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """Diffusion time t in [0, 1] -> (B, H): sinusoidal features + MLP."""

    def __init__(self, hidden: int, num_features: int = 256):
        super().__init__()
        self.num_features = num_features
        self.net = mlp(num_features, hidden, hidden)

    def forward(self, t: Tensor) -> Tensor:
        # Wavelengths 1e-3..10 resolve the 1000 discrete steps and still vary smoothly over [0, 1].
        # Features in at least float32: in bf16, t itself is off by up to 2e-3.
        dtype = self.net[0].weight.dtype
        t = t.to(torch.promote_types(dtype, torch.float32))
        return self.net(sinusoidal_features(t, self.num_features, 1e-3, 10.0).to(dtype))


class GaussianRBF(nn.Module):
    """Distance -> (E, K) Gaussians on a uniform grid over [0, cutoff], times a cosine cutoff.

    Gaussians rather than PaiNN's sin(n pi d / c) / d: noisy structures can put two atoms almost on
    top of each other, where 1/d would explode.
    """

    def __init__(self, num_rbf: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("centers", torch.linspace(0.0, cutoff, num_rbf), persistent=False)
        self.gamma = 0.5 / (cutoff / max(num_rbf - 1, 1)) ** 2

    def forward(self, dist: Tensor) -> Tensor:
        envelope = cosine_cutoff(dist, self.cutoff)  # (E,)
        rbf = torch.exp(-self.gamma * (dist[:, None] - self.centers.to(dist.dtype)) ** 2)
        return rbf * envelope[:, None]


def cosine_cutoff(dist: Tensor, cutoff: float) -> Tensor:
    """Smoothly goes to 0 at the cutoff, so edges appearing/disappearing there change nothing."""
    return 0.5 * (torch.cos(dist * (math.pi / cutoff)) + 1.0) * (dist < cutoff).to(dist.dtype)


class VectorNorm(nn.Module):
    """Equivariant RMS norm of vector features: divide by the RMS length over channels."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, v: Tensor) -> Tensor:  # (N, 3, H)
        mean_sq = v.pow(2).sum(dim=1, keepdim=True).mean(dim=2, keepdim=True)  # (N, 1, 1)
        return v * torch.rsqrt(mean_sq + self.eps)


def safe_norm(v: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """|v| with a finite gradient at v = 0 (vector features start at exactly zero)."""
    return torch.sqrt(v.pow(2).sum(dim=dim) + eps)


class PaiNNLayer(nn.Module):
    """One PaiNN block (Schütt et al. 2021): continuous-filter message, then gated update.

    Pre-norm residual with FiLM from the structure-level conditioning vector (time and, without
    adapters, properties), zero-initialised so the layer starts as plain PaiNN.
    """

    def __init__(self, hidden: int, num_rbf: int, backend: str = "torch"):
        super().__init__()
        self.hidden = hidden
        self.backend = backend
        self.norm_s = nn.LayerNorm(hidden)
        self.norm_v = VectorNorm()
        self.film = nn.Linear(hidden, 2 * hidden)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.phi = mlp(hidden, hidden, 3 * hidden)  # node part of the message
        self.filter = nn.Linear(num_rbf, 3 * hidden)  # edge part of the message
        self.vec_proj = nn.Linear(hidden, 2 * hidden, bias=False)  # U and V of PaiNN's update
        self.update_mlp = mlp(2 * hidden, hidden, 3 * hidden)

    def forward(self, s, v, cond, batch_index, edge_index, rbf, unit_vec):
        """s (N, H), v (N, 3, H), cond (B, H), rbf (E, K), unit_vec (E, 3) -> new (s, v)."""
        scale, shift = self.film(cond)[batch_index].chunk(2, dim=-1)  # (N, H) each
        s_in = self.norm_s(s) * (1 + scale) + shift
        v_in = self.norm_v(v)
        ds, dv = self.message(s_in, v_in, edge_index, rbf, unit_vec)
        s, v = s + ds, v + dv
        ds, dv = self.update(self.norm_s(s), self.norm_v(v))
        return s + ds, v + dv

    def message(self, s, v, edge_index, rbf, unit_vec):
        n = s.shape[0]
        phi_s, phi_v, phi_dir = self.phi(s).chunk(3, dim=-1)  # (N, H) each
        w_s, w_v, w_dir = self.filter(rbf).chunk(3, dim=-1)  # (E, H) each
        mp = partial(message_passing, edge_index=edge_index, num_nodes=n, backend=self.backend)
        ds = mp(phi_s, w_s)  # (N, H)
        dv = mp(v * phi_v[:, None, :], w_v[:, None, :])  # (N, 3, H): sum_j v_j phi_v(s_j) w_v(r_ij)
        # sum_j phi_dir(s_j) w_dir(r_ij) r_hat_ij: the filter carries the unit edge vector
        dv = dv + mp(phi_dir[:, None, :], unit_vec[:, :, None] * w_dir[:, None, :])
        return ds, dv

    def update(self, s, v):
        u, w = self.vec_proj(v).chunk(2, dim=-1)  # (N, 3, H) each
        a_vv, a_sv, a_ss = self.update_mlp(torch.cat([s, safe_norm(w, dim=1)], dim=-1)).chunk(3, dim=-1)
        dv = a_vv[:, None, :] * u
        ds = a_sv * (u * w).sum(dim=1) + a_ss
        return ds, dv
