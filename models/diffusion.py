"""CrystalDiffusion: the score network plus the three corruption processes and their losses.

This is the model that training and sampling share. It runs in a plain torch script (no
distributed setup, nothing from training): `loss(batch)` for training, `predict(...)` for the
sampler (`xtalgen.models.sampler`).

One time t ~ U(eps, 1) per structure drives all three processes (MatterGen's recipe, DESIGN §4):
  - atom types: absorbing-state D3PM, 1000 levels, linear mask rate (`types_process`);
  - fractional coordinates: wrapped-normal VE SDE, sigma 0.01 -> 5 divided by N^(1/3)
    (`coords_process`);
  - lattice: VP SDE toward (N/rho)^(1/3) I with per-entry variance 0.25 N^(2/3), symmetric
    lattices via polar decomposition (`lattice_process`).

Losses (MatterGen's reductions): per structure, the types and coordinates terms are summed over
atoms (coordinates: mean over the three axes), the lattice term is the mean over the 9 entries;
each is then averaged over structures, and the total is
loss_weight_lattice * L_lattice + loss_weight_coords * L_coords + loss_weight_types * L_types
(1, 0.1, 1 by default).

Types hybrid loss: this project's `DiffusionConfig.type_vb_weight` defines L = CE + w * L_vb
(w = 0.01). MatterGen's released code weights it the other way (L_vb + 0.01 * CE); on masked atoms
L_vb = CE / k (see `types_process`), so both are positive reweightings of the same cross-entropy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xtalgen.batch import CrystalBatch
from xtalgen.models.coords_process import WrappedNormalCoordProcess, cartesian_to_fractional
from xtalgen.models.lattice_process import LatticeVPProcess, polar_symmetric
from xtalgen.models.types_process import AbsorbingTypeProcess
from xtalgen.schema import DiffusionConfig, ModelConfig

TIME_EPS = 1e-5  # t ~ U(TIME_EPS, 1) in training (MatterGen's UniformTimestepSampler min_t)


@dataclass
class Prediction:
    """Network outputs in the processes' own spaces (what the losses and the sampler consume)."""

    type_logits: torch.Tensor  # (N, 100) logits of p(x_0 | x_t) over Z = 1..100
    coords: torch.Tensor  # (N, 3) sigma * score, fractional units
    lattice: torch.Tensor  # (B, 3, 3) std * score, symmetric


@dataclass
class NoisyCrystals:
    """A batch of structures at some diffusion time (types may hold the mask token 0)."""

    atomic_numbers: torch.Tensor  # (N,) long, 0 = mask
    frac_coords: torch.Tensor  # (N, 3) in [0, 1)
    lattice: torch.Tensor  # (B, 3, 3) symmetric
    num_atoms: torch.Tensor  # (B,) long
    batch_index: torch.Tensor  # (N,) long


def normalize_stats(stats: Mapping) -> dict:
    """Check the manifest statistics the model needs and make them plain Python (int keys)."""
    if "mean_density" not in stats:
        raise ValueError("model stats need 'mean_density' (atoms/Å^3) from the shard manifest")
    histogram = stats.get("num_atoms_histogram") or {}
    return {
        **{k: v for k, v in stats.items() if k not in ("mean_density", "num_atoms_histogram")},
        "mean_density": float(stats["mean_density"]),
        "num_atoms_histogram": {int(n): int(c) for n, c in histogram.items()},
    }


class CrystalDiffusion(nn.Module):
    """Score network + corruption processes. Its state dict is the score network's."""

    def __init__(
        self,
        score_net: nn.Module,
        diffusion_cfg: DiffusionConfig,
        stats: Mapping,
        condition_names: Sequence[str] | None = None,
    ):
        super().__init__()
        self.score_net = score_net
        self.cfg = diffusion_cfg
        self.stats = normalize_stats(stats)
        density = diffusion_cfg.lattice_density or self.stats["mean_density"]
        self.types = AbsorbingTypeProcess(diffusion_cfg.num_steps)
        self.coords = WrappedNormalCoordProcess(diffusion_cfg.coord_sigma_min, diffusion_cfg.coord_sigma_max)
        self.lattice = LatticeVPProcess(diffusion_cfg.lattice_beta_min, diffusion_cfg.lattice_beta_max, density)
        if hasattr(score_net, "prior_density"):  # the network reads the cell against the prior's cube
            score_net.prior_density = float(density)
        if condition_names is None:  # ask the network which properties it embeds
            conditioning = getattr(score_net, "conditioning", None)
            condition_names = getattr(conditioning, "names", ())
        self.condition_names = list(condition_names)

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @property
    def work_dtype(self) -> torch.dtype:
        """Precision of the processes, targets and losses: at least float32, also for a bf16
        network (bf16 fractional coordinates are off by ~4e-3, more than the smallest sigma)."""
        return torch.promote_types(self.dtype, torch.float32)

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    # --- network ----------------------------------------------------------------------------
    def predict(
        self,
        x: NoisyCrystals,
        t: torch.Tensor,
        conditions: dict[str, torch.Tensor] | None = None,
        condition_mask: dict[str, torch.Tensor] | None = None,
    ) -> Prediction:
        """Run the network on noisy crystals at times t (B,) and map its outputs to process space."""
        out = self.score_net(
            x.atomic_numbers,
            x.frac_coords,
            x.lattice,
            x.num_atoms,
            x.batch_index,
            t,
            conditions=conditions or None,
            condition_mask=condition_mask or None,
        )
        work = x.frac_coords.dtype
        coords = cartesian_to_fractional(out.coord_vectors.to(work), x.lattice, x.batch_index)
        return Prediction(out.type_logits.to(work), coords, out.lattice_matrix.to(work))

    def batch_conditions(self, batch: CrystalBatch) -> tuple[dict, dict]:
        """The configured conditions a batch carries: values and presence masks.

        A property the batch lacks altogether is left out, so the network uses its null token.
        """
        values, masks = {}, {}
        for name in self.condition_names:
            if name in batch.properties:
                values[name] = batch.properties[name]
                masks[name] = batch.property_mask[name].to(torch.bool)
        return values, masks

    # --- training ---------------------------------------------------------------------------
    def corrupt(self, batch: CrystalBatch, t: torch.Tensor):
        """Noise a clean batch to times t (B,) with torch's global RNG.

        Returns the noisy crystals, the type level of every atom (N,), the coordinate target
        sigma * score (N, 3) and the lattice target -z (B, 3, 3).
        """
        num_atoms_per_atom = batch.num_atoms[batch.batch_index]  # (N,)
        t_atom = t[batch.batch_index]  # (N,)

        level = self.types.level(t_atom)  # (N,)
        types_t = self.types.sample_marginal(batch.atomic_numbers, level)

        sigma = self.coords.sigma(t_atom, num_atoms_per_atom)  # (N,)
        frac_t = self.coords.sample_marginal(batch.frac_coords, sigma)
        coords_target = self.coords.score_times_sigma(frac_t, batch.frac_coords, sigma)

        # float64 SVD: the clean lattice is the one quantity not re-drawn every step
        lattice_0 = polar_symmetric(batch.lattice.double()).to(batch.lattice.dtype)
        lattice_t, z = self.lattice.sample_marginal(lattice_0, t, batch.num_atoms)
        noisy = NoisyCrystals(types_t, frac_t, lattice_t, batch.num_atoms, batch.batch_index)
        return noisy, level, coords_target, -z

    def loss(self, batch: CrystalBatch) -> dict[str, torch.Tensor]:
        """Weighted diffusion loss of a clean batch; t and noise come from torch's global RNG."""
        batch = batch.to(self.device, dtype=self.work_dtype)
        num_structures = batch.num_structures
        t = TIME_EPS + (1 - TIME_EPS) * torch.rand(num_structures, device=self.device, dtype=self.work_dtype)
        noisy, level, coords_target, lattice_target = self.corrupt(batch, t)
        values, masks = self.batch_conditions(batch)
        pred = self.predict(noisy, t, values, masks)

        per_atom_types = self.types.loss_per_atom(
            batch.atomic_numbers, noisy.atomic_numbers, pred.type_logits, level, self.cfg.type_vb_weight
        )
        per_atom_coords = (pred.coords - coords_target).square().mean(-1)  # (N,)
        per_structure_lattice = (pred.lattice - lattice_target).square().mean((-1, -2))  # (B,)

        loss_types = _sum_per_structure(per_atom_types, batch.batch_index, num_structures).mean()
        loss_coords = _sum_per_structure(per_atom_coords, batch.batch_index, num_structures).mean()
        loss_lattice = per_structure_lattice.mean()
        total = (
            self.cfg.loss_weight_lattice * loss_lattice
            + self.cfg.loss_weight_coords * loss_coords
            + self.cfg.loss_weight_types * loss_types
        )
        return {
            "loss": total,
            "loss_lattice": loss_lattice,
            "loss_coords": loss_coords,
            "loss_types": loss_types,
        }


def _sum_per_structure(per_atom: torch.Tensor, batch_index: torch.Tensor, num_structures: int):
    out = torch.zeros(num_structures, dtype=per_atom.dtype, device=per_atom.device)
    return out.index_add(0, batch_index, per_atom)


def build_model(cfg: ModelConfig, stats: Mapping) -> CrystalDiffusion:
    """The configured score network wrapped with the diffusion processes."""
    from xtalgen.models.score_net import build_score_net  # the network module is E's; import late

    score_net = build_score_net(
        cfg.score_net,
        conditions=list(cfg.conditions),
        condition_dropout=cfg.condition_dropout,
        adapters=cfg.adapters,
    )
    return CrystalDiffusion(score_net, cfg.diffusion, stats, [c.name for c in cfg.conditions])
