"""Atom types: D3PM absorbing-state ("mask") diffusion over 100 elements plus a mask token.

States are atomic numbers 1..100 and the mask token 0 (the absorbing state). The process has N
discrete levels (MatterGen: 1000); level 0 is clean data and level N is all-mask.

Schedule: D3PM's "standard" absorbing schedule (Sohl-Dickstein et al.; MatterGen's released
`kind: standard`): the step k-1 -> k masks an unmasked atom with probability beta_k = 1 / (N - k + 1).
Its cumulative keep probability is a product that telescopes,

    alpha_bar_k = prod_{j<=k} (1 - 1/(N - j + 1)) = (N - k) / N,

so the mask rate is *linear*: q(x_k = mask | x_0) = k / N, and q(x_k = x_0 | x_0) = 1 - k / N.

Continuous time t in [0, 1] (shared with the other two processes) maps to the level
k(t) = floor(t (N - 1)) + 1 in [1, N], as MatterGen does (its `to_discrete_time` + 1).

Posterior between any two levels j < k (used by the reverse step with any number of sampling steps):
an unmasked atom stays as it is, and a masked atom becomes x_0 with probability
(alpha_bar_j - alpha_bar_k) / (1 - alpha_bar_k) = (k - j) / k, else stays masked (prob. j / k).
With the network's prediction p(x_0 | x_k) in place of x_0 this is the model's reverse kernel.

Loss (D3PM hybrid): for a masked atom at level k the one-step variational-bound term is
KL(q(x_{k-1} | x_k, x_0) || p(x_{k-1} | x_k)) = -(1/k) log p(x_0 | x_k) exactly (both kernels keep
mass (k-1)/k on the mask and differ only in the 1/k that goes to elements), and at k = 1 it is the
decoder term -log p(x_0 | x_1), the same formula. Unmasked atoms contribute nothing to the bound
(the reverse kernel copies them), so their cross-entropy is left out too: the prediction at an
unmasked atom is never used. loss_atom = CE + vb_weight * CE / k on masked atoms, 0 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_TOKEN = 0
NUM_ELEMENTS = 100  # logits column z-1 is element Z = z


def uniform(shape, *, generator: torch.Generator | None, device, dtype=torch.float64) -> torch.Tensor:
    """U[0, 1) draws from `generator` (or torch's global RNG), returned on `device`.

    Draws are made on the generator's device and then moved, so a CPU generator gives the same
    numbers whatever device the model runs on.
    """
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class AbsorbingTypeProcess:
    """Closed-form forward marginals, reverse step and hybrid loss of the mask diffusion."""

    def __init__(self, num_levels: int = 1000):
        if num_levels < 2:
            raise ValueError(f"the type process needs at least 2 levels, got {num_levels}")
        self.num_levels = int(num_levels)

    # --- time and schedule ------------------------------------------------------------------
    def level(self, t: torch.Tensor) -> torch.Tensor:
        """Discrete level k(t) = floor(t (N-1)) + 1 in [1, N] for continuous t in [0, 1]."""
        k = torch.floor(t.double() * (self.num_levels - 1)).long() + 1
        return k.clamp(1, self.num_levels)

    def mask_probability(self, level: torch.Tensor) -> torch.Tensor:
        """q(x_k = mask | x_0) = 1 - alpha_bar_k = k / N (linear mask rate)."""
        return level.double() / self.num_levels

    def step_mask_probability(self, level: torch.Tensor) -> torch.Tensor:
        """beta_k = 1 / (N - k + 1): probability that step k-1 -> k masks an unmasked atom."""
        return 1.0 / (self.num_levels - level.double() + 1.0)

    # --- forward process --------------------------------------------------------------------
    def sample_marginal(
        self, x0: torch.Tensor, level: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw x_k ~ q(x_k | x_0): each atom masked independently with probability k / N.

        x0: (N,) long in 1..100; level: (N,) long, per atom. Returns (N,) long, 0 = mask.
        """
        u = uniform(x0.shape, generator=generator, device=x0.device)
        masked = u < self.mask_probability(level)
        return torch.where(masked, torch.full_like(x0, MASK_TOKEN), x0)

    def prior(self, num_atoms_total: int, device) -> torch.Tensor:
        """At t = 1 (level N) every atom is masked."""
        return torch.full((num_atoms_total,), MASK_TOKEN, dtype=torch.long, device=device)

    # --- reverse process --------------------------------------------------------------------
    def unmask_probability(self, level_from: torch.Tensor, level_to: torch.Tensor) -> torch.Tensor:
        """q(x_j != mask | x_k = mask, x_0) = (k - j) / k for j < k (1 when j = 0)."""
        k, j = level_from.double(), level_to.double()
        return ((k - j) / k).clamp(0.0, 1.0)

    def reverse_step(
        self,
        x_t: torch.Tensor,
        logits: torch.Tensor,
        level_from: torch.Tensor,
        level_to: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_j ~ p(x_j | x_k) = sum_x0 q(x_j | x_k, x_0) p(x_0 | x_k), per atom.

        x_t: (N,) long; logits: (N, 100) over Z = 1..100; level_from/level_to: (N,) long, j <= k.
        Unmasked atoms are kept; a masked atom is revealed with probability (k - j) / k, and then
        takes an element drawn from softmax(logits). Both draws are always made so that the
        random stream consumed does not depend on the data (determinism given a generator).
        """
        u = uniform(x_t.shape, generator=generator, device=x_t.device)
        probs = torch.softmax(logits.double(), dim=-1)  # (N, 100)
        if generator is None:
            drawn = torch.multinomial(probs, 1).squeeze(-1)
        else:
            drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator)
            drawn = drawn.squeeze(-1).to(x_t.device)
        reveal = (x_t == MASK_TOKEN) & (u < self.unmask_probability(level_from, level_to))
        return torch.where(reveal, drawn + 1, x_t)

    # --- loss -------------------------------------------------------------------------------
    def loss_per_atom(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        logits: torch.Tensor,
        level: torch.Tensor,
        vb_weight: float,
    ) -> torch.Tensor:
        """Hybrid loss CE(x_0 | x_k) + vb_weight * L_vb per atom; zero on unmasked atoms.

        x0, x_t: (N,) long; logits: (N, 100); level: (N,) long. Returns (N,) in logits' dtype.
        """
        cross_entropy = F.cross_entropy(logits, x0 - 1, reduction="none")  # (N,)
        variational_bound = cross_entropy / level.to(cross_entropy.dtype)  # exact, see module doc
        masked = (x_t == MASK_TOKEN).to(cross_entropy.dtype)
        return masked * (cross_entropy + vb_weight * variational_bound)
