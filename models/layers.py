"""Building blocks of the score network: embeddings, radial basis, PaiNN-style equivariant layers.

Feature convention: scalars `s` (N, H) are rotation-invariant; vectors `v` (N, 3, H) rotate with
the Cartesian frame (H channels of 3-vectors). Every operation on `v` is linear in `v` along the
channel axis, or multiplies it by invariants, so equivariance holds by construction.
"""

from __future__ import annotations

import math

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
        exponent = self.gamma * (dist[:, None] - self.centers.to(dist.dtype)) ** 2  # (E, K)
        # Gaussians centred ~3 Å or more from the distance fall below float32's smallest normal
        # number (1.2e-38): a third to a half of each row. CPUs compute exp() into, and multiply
        # by, such subnormal numbers 15-100x slower (measured), which made this basis and the
        # filter matmul over it the largest costs of sampling a small model. They are exactly 0
        # here instead, a change of less than 1.2e-38 per entry.
        tiny = torch.finfo(dist.dtype).tiny
        limit = -math.log(tiny)  # exp(-limit) = tiny; the clamp keeps exp() itself off subnormals
        rbf = torch.exp(-exponent.clamp(max=limit)) * envelope[:, None]
        return rbf.masked_fill((exponent >= limit) | (rbf < tiny), 0.0)


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


def vector_message(
    node_vec: Tensor | None, w_vec: Tensor | None, node_dir: Tensor, w_dir: Tensor, unit_vec: Tensor,
    edge_index: Tensor, num_nodes: int,
) -> Tensor:
    """out_i = sum_j node_vec_j w_vec_ij + node_dir_j w_dir_ij r_hat_ij, with a single scatter.

    node_vec (N, 3, C) or None (no first term), node_dir (N, C), w_vec and w_dir (E, C),
    unit_vec (E, 3) -> (N, 3, C).

    Both terms are summed per edge before the scatter-add, so the (E, 3, C) scatter, its zero-fill
    and its backward gather run once instead of twice. Hand-written rather than two
    `message_passing` calls because that primitive is a single gather-multiply-scatter.
    """
    source, target = edge_index
    directional = unit_vec[:, :, None] * (node_dir.index_select(0, source) * w_dir)[:, None, :]  # (E, 3, C)
    messages = directional
    if node_vec is not None:
        messages = torch.addcmul(directional, node_vec.index_select(0, source), w_vec[:, None, :])  # (E, 3, C)
    # Sums of ~50 messages lose most of bf16's 8 mantissa bits: accumulate in at least float32.
    acc_dtype = torch.promote_types(messages.dtype, torch.float32)
    out = messages.new_zeros(num_nodes, *messages.shape[1:], dtype=acc_dtype)
    return out.index_add_(0, target, messages.to(acc_dtype)).to(messages.dtype)


class PaiNNLayer(nn.Module):
    """One PaiNN block (Schütt et al. 2021): continuous-filter message, then gated update.

    The message runs at `edge_hidden` (H_e) channels, narrower than the atoms' `hidden` (H): the
    per-edge work (filters, gathers, scatters; ~50 edges per atom) is elementwise and bound by memory
    traffic, so it scales with H_e, while the parameters sit in per-atom matmuls (H -> H_e into the
    message, H_e -> H out of it, and the H-wide update), which run ~50x fewer rows.

    Pre-norm residual with FiLM from the structure-level conditioning vector (time and, without
    adapters, properties), zero-initialised so the layer starts as plain PaiNN.

    `vector_input=False` (the first layer, whose vector features are still exactly zero) drops the
    vector-to-vector term of the message and its weights, which could never be trained.
    """

    def __init__(
        self,
        hidden: int,
        num_rbf: int,
        edge_hidden: int | None = None,
        backend: str = "torch",
        vector_input: bool = True,
    ):
        super().__init__()
        edge_hidden = edge_hidden or hidden
        self.hidden = hidden
        self.edge_hidden = edge_hidden
        self.backend = backend
        self.norm_s = nn.LayerNorm(hidden)
        self.norm_v = VectorNorm()
        self.film = nn.Linear(hidden, 2 * hidden)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        terms = 3 if vector_input else 2  # scalar, [vector,] directional
        self.phi = mlp(hidden, hidden, terms * edge_hidden)  # node part of the message
        self.filter = nn.Linear(num_rbf, terms * edge_hidden)  # edge part of the message
        # No bias on vector channels: a bias would not rotate with the frame.
        self.vec_in = nn.Linear(hidden, edge_hidden, bias=False) if vector_input else None  # H -> H_e
        self.scalar_out = nn.Linear(edge_hidden, hidden)  # message sums back to H, per atom
        self.vec_out = nn.Linear(edge_hidden, hidden, bias=False)
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
        phi = self.phi(s).chunk(3 if self.vec_in is not None else 2, dim=-1)  # (N, H_e) each
        w = self.filter(rbf).chunk(len(phi), dim=-1)  # (E, H_e) each
        ds = message_passing(phi[0], w[0], edge_index, num_nodes=n, backend=self.backend)  # (N, H_e)
        # sum_j v_j phi_v(s_j) w_v(r_ij) + phi_dir(s_j) w_dir(r_ij) r_hat_ij; phi_v applied per atom
        v_scaled, w_v = None, None
        if self.vec_in is not None:
            v_scaled, w_v = self.vec_in(v) * phi[1][:, None, :], w[1]  # (N, 3, H_e), (E, H_e)
        dv = vector_message(v_scaled, w_v, phi[-1], w[-1], unit_vec, edge_index, n)  # (N, 3, H_e)
        return self.scalar_out(ds), self.vec_out(dv)  # (N, H), (N, 3, H)

    def update(self, s, v):
        u, w = self.vec_proj(v).chunk(2, dim=-1)  # (N, 3, H) each
        a_vv, a_sv, a_ss = self.update_mlp(torch.cat([s, safe_norm(w, dim=1)], dim=-1)).chunk(3, dim=-1)
        dv = a_vv[:, None, :] * u
        ds = a_sv * (u * w).sum(dim=1) + a_ss
        return ds, dv
