"""Predictor-corrector sampling of crystals, with classifier-free guidance (DESIGN §7).

Starting from the prior at t = 1 (all atoms masked, uniform fractional coordinates, lattices from
the limit distribution of `lattice_process`), the time grid t_0 = 1 > ... > t_{S-1} = 1e-3 is walked
down (MatterGen: S = 1000, eps = 1/1000). At every t_i:

  corrector (x `corrector_steps`): one Langevin step for coordinates (snr 0.4) and lattice (snr 0.2)
      x <- x + eps * score + sqrt(2 eps) z,  eps = 2 alpha (snr |z| / |score|)^2,
      norms per structure (MatterGen uses batch means; per structure makes a structure's update
      independent of its batch mates), alpha = abar(t_i) / abar(t_{i+1}) for the VP lattice and 1
      for the VE coordinates; coordinates are wrapped, lattices re-symmetrised by polar
      decomposition (as MatterGen);
  predictor (`eta` = 1, the default; eta < 1 gives the DDIM family, 0 deterministic): ancestral step
      of each process from t_i to t_{i+1}: the exact Gaussian posterior
      q(x_s | x_t, x_0) with x_0 estimated from the score (Tweedie) for coordinates (then wrapped)
      and lattice, and the absorbing-state posterior with p(x_0 | x_t) for types.

  predictor `heun` (`sample.predictor=heun`): Heun's second-order step of the probability-flow ODE
      for coordinates and lattice (Karras et al. 2022): a DDIM (Euler) step to t_{i+1}, a second
      network evaluation there, then the step from t_i again with the mean of the two predicted
      noises. Types take the absorbing-state posterior of the first evaluation. Two evaluations
      a step (one on the last step, which lands on the denoised mean).

The last predictor step goes to s = 0: no noise is added, so it returns the denoised means, every
masked atom is revealed, coordinates are wrapped to [0, 1) and the lattice is made symmetric
positive-definite. Each step costs (corrector_steps + 1) network evaluations (2 by default).

Guidance: score = uncond + gamma (cond - uncond) for coordinates and lattice and the same on the
type logits (p_gamma(x | y) ∝ p(x)^(1-gamma) p(x | y)^gamma), computed in one pass over a doubled
batch. gamma = 1 is conditional-only and gamma = 0 unconditional (one pass each).

Space-group constraint (`symmetry`, a `models.symmetry.SymmetryConstraint`, one template per
structure): the prior and the state after every corrector, predictor and Heun stage are projected
onto the template's symmetric set (lattice metric, Wyckoff orbits, one element per orbit), so every
sample has at least the template's space group. None (the default) leaves sampling untouched.

All randomness comes from `generator` (drawn on its device, then moved): the same generator state
gives the same structures.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from xtalgen.batch import CrystalBatch
from xtalgen.models.coords_process import gaussian, wrap
from xtalgen.models.diffusion import CrystalDiffusion, NoisyCrystals, Prediction
from xtalgen.models.lattice_process import polar_symmetric, symmetric_noise
from xtalgen.models.symmetry import SymmetryConstraint

SAMPLING_EPS_T = 1e-3  # last time on the grid (MatterGen: eps_t = 1/N with N = 1000)
PREDICTORS = ("ancestral", "heun")


def time_grid(num_steps: int, power: float = 1.0) -> list[float]:
    """t_0 = 1 > ... > t_{S-1} = SAMPLING_EPS_T, spaced as t_i = eps + (1 - eps) (1 - i / (S - 1))^power.

    power = 1 is MatterGen's uniform grid; power > 1 puts more of the steps near t = 0, where the
    coordinate noise is smallest and a crystal's positions are settled (the VE sigma is geometric
    in t, so a uniform grid spends as many steps on sigma > 1 Å as on sigma < 0.1 Å).
    """
    if num_steps == 1:
        return [1.0]
    if power == 1.0:  # exactly the grid of earlier versions, so their samples reproduce bit for bit
        return torch.linspace(1.0, SAMPLING_EPS_T, num_steps, dtype=torch.float64).tolist()
    frac = torch.linspace(1.0, 0.0, num_steps, dtype=torch.float64) ** power
    return (SAMPLING_EPS_T + (1.0 - SAMPLING_EPS_T) * frac).tolist()


def sample_num_atoms(stats: Mapping, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw `count` structure sizes from the manifest's number-of-atoms histogram, (count,) long."""
    histogram = {int(n): float(c) for n, c in (stats.get("num_atoms_histogram") or {}).items()}
    histogram = {n: c for n, c in histogram.items() if c > 0 and n > 0}
    if not histogram:
        raise ValueError("stats have no 'num_atoms_histogram'; give the number of atoms explicitly")
    sizes = torch.tensor(sorted(histogram), dtype=torch.long)
    weights = torch.tensor([histogram[int(n)] for n in sizes], dtype=torch.float64)
    picks = torch.multinomial(weights, count, replacement=True, generator=generator)
    return sizes[picks]


def _prepare_conditions(model: CrystalDiffusion, conditions, num_structures: int) -> dict:
    """Broadcast condition values (scalar, (B,) or (B, ...)) to the batch on the model's device."""
    prepared = {}
    for name, value in (conditions or {}).items():
        if name not in model.condition_names:
            known = sorted(model.condition_names) or "no properties"
            raise ValueError(f"the model is not conditioned on {name!r}; it knows {known}")
        value = torch.as_tensor(value, device=model.device)
        if value.is_floating_point():
            value = value.to(model.work_dtype)
        if value.dim() == 0 or (value.dim() == 1 and value.shape[0] != num_structures):
            value = value.expand(num_structures, *value.shape)  # one value for every structure
        prepared[name] = value
    return prepared


def constrained(x: NoisyCrystals, symmetry: SymmetryConstraint) -> NoisyCrystals:
    """The state projected onto the symmetric set of its templates (see `models.symmetry`)."""
    return NoisyCrystals(
        symmetry.types(x.atomic_numbers),
        symmetry.coords(x.frac_coords),
        symmetry.lattice(x.lattice),
        x.num_atoms,
        x.batch_index,
    )


def _doubled(x: NoisyCrystals) -> NoisyCrystals:
    """The batch twice over: structures B..2B-1 repeat 0..B-1 (for a one-pass guidance)."""
    num_structures = x.num_atoms.shape[0]
    return NoisyCrystals(
        torch.cat([x.atomic_numbers, x.atomic_numbers]),
        torch.cat([x.frac_coords, x.frac_coords]),
        torch.cat([x.lattice, x.lattice]),
        torch.cat([x.num_atoms, x.num_atoms]),
        torch.cat([x.batch_index, x.batch_index + num_structures]),
    )


def guided_prediction(
    model: CrystalDiffusion,
    x: NoisyCrystals,
    t: torch.Tensor,
    conditions: dict[str, torch.Tensor] | None,
    guidance_scale: float,
    single_pass_shortcuts: bool = True,
) -> Prediction:
    """Classifier-free guided outputs: lerp(uncond, cond, gamma) for all three outputs."""
    if not conditions:
        return model.predict(x, t)
    num_structures = t.shape[0]
    present = {k: torch.ones(num_structures, dtype=torch.bool, device=t.device) for k in conditions}
    if single_pass_shortcuts and guidance_scale == 1.0:
        return model.predict(x, t, conditions, present)
    if single_pass_shortcuts and guidance_scale == 0.0:
        absent = {k: torch.zeros_like(v) for k, v in present.items()}
        return model.predict(x, t, conditions, absent)

    doubled_conditions = {k: torch.cat([v, v]) for k, v in conditions.items()}
    doubled_mask = {k: torch.cat([torch.zeros_like(v), v]) for k, v in present.items()}
    both = model.predict(_doubled(x), torch.cat([t, t]), doubled_conditions, doubled_mask)
    num_atoms_total = x.atomic_numbers.shape[0]

    def combine(out: torch.Tensor, split: int) -> torch.Tensor:
        return torch.lerp(out[:split], out[split:], guidance_scale)

    return Prediction(
        type_logits=combine(both.type_logits, num_atoms_total),
        coords=combine(both.coords, num_atoms_total),
        lattice=combine(both.lattice, num_structures),
    )


def _langevin_step_size(score, noise, index, num_structures, snr, alpha):
    """eps = 2 alpha (snr |noise| / |score|)^2 per structure; 0 where the score vanishes."""
    flat = score.reshape(score.shape[0], -1).square().sum(-1)
    flat_noise = noise.reshape(noise.shape[0], -1).square().sum(-1)
    zeros = torch.zeros(num_structures, dtype=score.dtype, device=score.device)
    score_norm = zeros.index_add(0, index, flat).sqrt()
    noise_norm = zeros.index_add(0, index, flat_noise).sqrt()
    step = 2 * alpha * (snr * noise_norm / score_norm.clamp_min(torch.finfo(score.dtype).tiny)) ** 2
    return torch.where(score_norm > 0, step, torch.zeros_like(step))


def corrector_step(model, x: NoisyCrystals, pred: Prediction, t, t_next, coord_snr, lattice_snr, generator,
                   symmetry: SymmetryConstraint | None = None):
    """One Langevin corrector step for coordinates and lattice (types have none). Under a
    `symmetry` constraint the noise is drawn in the symmetric set (`SymmetryConstraint.coord_tangent`)."""
    dtype, device = x.frac_coords.dtype, x.frac_coords.device
    num_structures = x.num_atoms.shape[0]
    all_structures = torch.arange(num_structures, device=device)

    sigma = model.coords.sigma(t[x.batch_index], x.num_atoms[x.batch_index])  # (N,)
    coord_score = pred.coords / sigma.unsqueeze(-1)
    z = gaussian(x.frac_coords.shape, generator=generator, device=device, dtype=dtype)
    if symmetry is not None:
        z = symmetry.coord_tangent(x.frac_coords, z)
    eps = _langevin_step_size(coord_score, z, x.batch_index, num_structures, coord_snr, 1.0)
    eps = eps[x.batch_index].unsqueeze(-1)
    frac = wrap(x.frac_coords + eps * coord_score + torch.sqrt(2 * eps) * z)

    std = model.lattice.std(t, x.num_atoms)[:, None, None]
    lattice_score = pred.lattice / std
    z = symmetric_noise(num_structures, generator=generator, device=device, dtype=dtype)
    if symmetry is not None:
        z = symmetry.lattice_tangent(x.lattice, z)
    alpha = (model.lattice.mean_coeff(t) / model.lattice.mean_coeff(t_next)) ** 2
    eps = _langevin_step_size(lattice_score, z, all_structures, num_structures, lattice_snr, alpha)
    eps = eps[:, None, None]
    lattice = polar_symmetric(x.lattice + eps * lattice_score + torch.sqrt(2 * eps) * z)
    return NoisyCrystals(x.atomic_numbers, frac, lattice, x.num_atoms, x.batch_index)


def predictor_step(model, x: NoisyCrystals, pred: Prediction, t, t_next, is_last, generator, eta: float = 1.0):
    """Step of every process from t to t_next (t_next = 0 on the last step: no noise).

    eta = 1 is the ancestral step (the exact Gaussian posterior around the Tweedie estimate); eta = 0
    the deterministic DDIM step for coordinates and lattice (Song et al. 2021), which keeps the
    predicted noise instead of drawing it afresh; between, DDIM's interpolation. Types always take
    the absorbing-state posterior.
    """
    dtype, device = x.frac_coords.dtype, x.frac_coords.device
    num_structures = x.num_atoms.shape[0]
    atom_num = x.num_atoms[x.batch_index]

    # Types: absorbing-state posterior between levels k(t) and k(t_next) (0 on the last step).
    level_from = model.types.level(t[x.batch_index])
    level_to = torch.zeros_like(level_from) if is_last else model.types.level(t_next[x.batch_index])
    types = model.types.reverse_step(x.atomic_numbers, pred.type_logits, level_from, level_to, generator)

    # Coordinates (VE): mean = x + (s_t^2 - s_s^2) score, std = sqrt(s_t^2 - s_s^2) s_s / s_t.
    sigma_t = model.coords.sigma(t[x.batch_index], atom_num).unsqueeze(-1)
    sigma_s = model.coords.sigma(t_next[x.batch_index], atom_num).unsqueeze(-1)
    sigma_s = torch.zeros_like(sigma_s) if is_last else sigma_s
    var_step = sigma_t.square() - sigma_s.square()
    z = gaussian(x.frac_coords.shape, generator=generator, device=device, dtype=dtype)
    if eta == 1.0:
        mean = x.frac_coords + var_step * pred.coords / sigma_t
        frac = wrap(mean + var_step.sqrt() * sigma_s / sigma_t * z)
    else:  # DDIM family: x_s = x0_hat + sqrt(s_s^2 - c^2) eps_hat + c z, eps_hat = -pred, x0_hat = x + s_t pred
        noise = eta * var_step.sqrt() * sigma_s / sigma_t  # (N, 1) c: eta times the ancestral std
        kept = (sigma_s.square() - noise.square()).clamp_min(0).sqrt()
        frac = wrap(x.frac_coords + (sigma_t - kept) * pred.coords + noise * z)

    # Lattice (VP toward mu_N): Gaussian posterior with x_0 from Tweedie, shifted by the limit mean.
    a_t = model.lattice.mean_coeff(t)[:, None, None]
    a_s = model.lattice.mean_coeff(t_next)[:, None, None]
    std_t = model.lattice.std(t, x.num_atoms)[:, None, None]
    std_s = torch.zeros_like(std_t) if is_last else model.lattice.std(t_next, x.num_atoms)[:, None, None]
    a_ts = a_t / a_s
    var_ts = std_t.square() - std_s.square() * a_ts.square()
    limit_mean = model.lattice.limit_mean(x.num_atoms, dtype)
    z = symmetric_noise(num_structures, generator=generator, device=device, dtype=dtype)
    ancestral_std = var_ts.clamp_min(0).sqrt() * std_s / std_t
    if eta == 1.0:
        mean = (x.lattice + var_ts * pred.lattice / std_t - (1 - a_ts) * limit_mean) / a_ts
        lattice = mean + ancestral_std * z
    else:  # DDIM family around the Tweedie estimate x0_hat, with eps_hat = -pred
        x0_hat = (x.lattice - (1 - a_t) * limit_mean + std_t * pred.lattice) / a_t
        noise = eta * ancestral_std
        kept = (std_s.square() - noise.square()).clamp_min(0).sqrt()
        lattice = a_s * x0_hat + (1 - a_s) * limit_mean - kept * pred.lattice + noise * z
    lattice = 0.5 * (lattice + lattice.transpose(1, 2))
    return NoisyCrystals(types, frac, lattice, x.num_atoms, x.batch_index)


def heun_step(model, x: NoisyCrystals, pred: Prediction, t, t_next, is_last, generator, predict) -> NoisyCrystals:
    """Heun's step of the probability-flow ODE from t to t_next for coordinates and lattice.

    In the noise parametrisation both ODEs read d x / d sigma = -pred (coordinates, VE) and the
    DDIM update for the VP lattice, so Euler's step is `predictor_step(eta=0)`. Heun re-evaluates
    the network at the Euler point (types already revealed there) and steps from x again with the
    average of the two predictions: second order in the step, where Euler is first order. The last
    step (to t = 0, the denoised mean) stays an Euler step, as in Karras et al. `predict(x, t)` is
    the (guided) network call.
    """
    euler = predictor_step(model, x, pred, t, t_next, is_last, generator, eta=0.0)
    if is_last:
        return euler
    pred_next = predict(euler, t_next)
    averaged = Prediction(
        type_logits=pred.type_logits,  # unused below: the types of the Euler step are kept
        coords=0.5 * (pred.coords + pred_next.coords),
        lattice=0.5 * (pred.lattice + pred_next.lattice),
    )
    step = predictor_step(model, x, averaged, t, t_next, is_last, generator, eta=0.0)
    return NoisyCrystals(euler.atomic_numbers, step.frac_coords, step.lattice, x.num_atoms, x.batch_index)


@torch.no_grad()
def sample(
    model: CrystalDiffusion,
    num_atoms: torch.Tensor,
    *,
    num_steps: int = 1000,
    corrector_steps: int = 1,
    coord_snr: float = 0.4,
    lattice_snr: float = 0.2,
    guidance_scale: float = 1.0,
    conditions: dict | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    time_power: float = 1.0,
    eta: float = 1.0,
    predictor: str = "ancestral",
    symmetry: SymmetryConstraint | None = None,
) -> CrystalBatch:
    """Generate one structure per entry of `num_atoms` (B,) by predictor-corrector sampling.

    Returns a CrystalBatch with atomic numbers 1..100, fractional coordinates in [0, 1) and
    symmetric lattices; `properties` holds the conditions used. Deterministic for a given
    generator state (None: a generator seeded from torch's global RNG).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not time_power > 0:
        raise ValueError(f"time_power must be > 0, got {time_power}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    was_training = model.training
    model.eval()  # no condition dropout, deterministic network
    try:
        return _sample(
            model, num_atoms, num_steps, corrector_steps, coord_snr, lattice_snr,
            guidance_scale, conditions, generator, progress, time_power, eta, predictor, symmetry,
        )
    finally:
        model.train(was_training)


def _sample(model, num_atoms, num_steps, corrector_steps, coord_snr, lattice_snr,
            guidance_scale, conditions, generator, progress, time_power, eta, predictor,
            symmetry=None) -> CrystalBatch:
    device, dtype = model.device, model.work_dtype
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    num_atoms = torch.as_tensor(num_atoms, dtype=torch.long).reshape(-1).to(device)
    if (num_atoms < 1).any():
        raise ValueError("every structure needs at least one atom")
    num_structures = num_atoms.shape[0]
    batch_index = torch.repeat_interleave(torch.arange(num_structures, device=device), num_atoms)
    conditions = _prepare_conditions(model, conditions, num_structures)
    if symmetry is not None:
        symmetry.check_sizes(num_atoms)
    project = (lambda state: state) if symmetry is None else (lambda state: constrained(state, symmetry))

    total = int(num_atoms.sum())
    x = project(NoisyCrystals(
        model.types.prior(total, device),
        model.coords.prior(total, generator=generator, device=device, dtype=dtype),
        model.lattice.prior(num_atoms, generator=generator, dtype=dtype),
        num_atoms,
        batch_index,
    ))
    times = time_grid(num_steps, time_power)
    for i in tqdm(range(num_steps), disable=not progress, desc="sampling", unit="step"):
        is_last = i == num_steps - 1
        t = torch.full((num_structures,), times[i], device=device, dtype=dtype)
        t_next = torch.full_like(t, 0.0 if is_last else times[i + 1])
        for _ in range(corrector_steps):
            pred = guided_prediction(model, x, t, conditions, guidance_scale)
            x = project(corrector_step(model, x, pred, t, t_next, coord_snr, lattice_snr, generator, symmetry))
        pred = guided_prediction(model, x, t, conditions, guidance_scale)
        if predictor == "heun":
            x = heun_step(model, x, pred, t, t_next, is_last, generator,
                          lambda state, time: guided_prediction(model, project(state), time, conditions,
                                                                guidance_scale))
        else:
            x = predictor_step(model, x, pred, t, t_next, is_last, generator, eta)
        x = project(x)

    present = {k: torch.ones(num_structures, dtype=torch.bool, device=device) for k in conditions}
    return CrystalBatch(
        lattice=polar_symmetric(x.lattice),
        frac_coords=wrap(x.frac_coords),
        atomic_numbers=x.atomic_numbers,
        num_atoms=num_atoms,
        batch_index=batch_index,
        properties=dict(conditions),
        property_mask=present,
    )
