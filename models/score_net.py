"""The equivariant score network: PaiNN-style scalar+vector message passing on the periodic graph.

Inputs per structure: atom types (0 = mask token of the absorbing type diffusion, 1..100 elements),
fractional coordinates, lattice and diffusion time t; optionally property conditions. Outputs:

* type_logits    (N, 100) invariant logits over Z = 1..100 (column Z-1)
* coord_vectors  (N, 3)   equivariant Cartesian vectors, from a gated equivariant readout of the
                          vector features
* lattice_matrix (B, 3, 3) symmetric, equivariant as R S R^T: the mean over the structure's edges of
                          w_e r_e r_e^T / |r_e|^2 with invariant edge weights w_e, plus an isotropic
                          term (mean over atoms) times the identity, plus a cell term
                          c_0 I + c_1 (X - I) built from the noisy cell itself (see below); means keep
                          the scale independent of the number of atoms and edges

Why the cell term: the lattice target is std * score = -z, the noise that moved the cell away from
(a blend of) the clean cell and the prior's cube. Edges alone see the cell only through distances
below the cutoff, so a cell that has grown past it has no edges and gets no restoring output, and
the reverse VP drift then multiplies its deviation by ~exp(int beta / 2) ~ 150 over a trajectory.
The network therefore also reads the cell. With mu_N = (N / rho)^(1/3) the edge of the prior's cube
(rho: the training mean density, set from the manifest by `CrystalDiffusion`), the Cartesian metric
G = L^T L / mu_N^2 (sum of the outer products of the lattice vectors: it rotates as R G R^T) gives

    X = G / sqrt(tr(G) / 3)          (B, 3, 3) equivariant, degree one in the cell's scale,

which equals the cell (in units of mu_N) when the cell is a scaled cube, and I for the prior's mean.
The coefficients c_0, c_1 come from an MLP of invariants: the time embedding, the mean atom scalars
and three cell invariants (log of the linear scale against the prior's cube, and two shape
measures), clamped so that far-out cells extrapolate linearly through X rather than through the
MLP. A k x k x k supercell has the same X and invariants, so its lattice output is unchanged; no
SVD is involved (cubic cells have degenerate singular values, where its gradient is undefined).

Why this design rather than MatterGen's GemNet-dT: GemNet's directional information comes from
triplets (about 2,400 per atom at 7 Å / 50 neighbours), and 63% of its time goes into 512x512
per-edge matmuls. Here the per-edge work is elementwise, O(edges x H_e) (a filter from the radial
basis and a gather-multiply-scatter at H_e edge channels, narrower than the atoms' H), while the
O(H^2) and O(H x H_e) matmuls run once per atom, ~50x fewer rows than per edge. Directional
information is carried by equivariant vector features instead of angles, so no triplets are
enumerated at all, and the network gets many more layers/width per FLOP.

The periodic graph (cutoff 7 Å, at most 50 nearest neighbours) is rebuilt from the noisy structure
on every forward pass, after wrapping fractional coordinates into [0, 1): the outputs do not depend
on which periodic image of an atom is given.

Conditioning: time embedding (sinusoidal + MLP) and, without adapters, the summed property
embedding form a per-structure vector that is added to the initial atom scalars and modulates each
layer (FiLM). With adapters (fine-tuning, MatterGen's recipe) properties enter only through
per-layer adapters whose last layer is zero-initialised, and through a zero-initialised linear map to
the element logits, so a base model's outputs are reproduced bit-for-bit until they train. A
chemical-system condition also reaches the element logits element by element (`ElementSetGate`,
zero-initialised too): its requested elements, and those of them that no unmasked atom of the
structure holds yet. Several chemical-system conditions request the union of their elements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from xtalgen.models.conditioning import ConditionEmbedding
from xtalgen.models.graph import available_backends, backend_unavailable_reason, radius_graph_pbc
from xtalgen.models.layers import GaussianRBF, PaiNNLayer, TimeEmbedding, mlp
from xtalgen.schema import ConfigError
from xtalgen.schema.model import ConditionConfig, ScoreNetConfig

NUM_ELEMENTS = 100
MASK_TOKEN = 0
# atoms/Å^3 of the lattice prior's cube until `CrystalDiffusion` sets the manifest's mean density
# (Alex-MP-20: 0.0577).
DEFAULT_PRIOR_DENSITY = 0.05
NUM_CELL_INVARIANTS = 3
# Clamp of the cell invariants fed to the coefficient MLP: beyond it a cell's output grows linearly
# through X instead of extrapolating the MLP (a linear scale of e^2 ~ 7x the prior's cube).
CELL_INVARIANT_LIMIT = 2.0

# Architecture presets; `xtalgen model info` prints their real parameter counts:
# debug 1.02M, base 44.8M (MatterGen's GemNet-dT: 44.6M), large 296M, xl 1.02B.
# Parameters sit in per-atom matmuls (~10 H^2 + 6 H H_e per layer) while the per-edge work is
# elementwise at the edge width H_e (memory-bound, ~50 edges per atom), so the edge cost is set by
# H_e alone and the atom width H buys parameters cheaply. The larger presets are wide rather than
# deep (base: 4 blocks, like MatterGen's).
PRESETS: dict[str, dict] = {
    "debug": {"hidden": 128, "edge_hidden": 64, "num_layers": 4, "num_rbf": 32},
    "base": {"hidden": 960, "edge_hidden": 128, "num_layers": 4, "num_rbf": 32},
    "large": {"hidden": 1792, "edge_hidden": 256, "num_layers": 8, "num_rbf": 64},
    "xl": {"hidden": 2752, "edge_hidden": 384, "num_layers": 12, "num_rbf": 64},
}


@dataclass
class ScoreOutput:
    type_logits: Tensor  # (N, 100) invariant logits over Z=1..100 (column Z-1)
    coord_vectors: Tensor  # (N, 3) equivariant Cartesian vectors
    lattice_matrix: Tensor  # (B, 3, 3) symmetric, equivariant as R S R^T


def resolve_architecture(cfg: ScoreNetConfig) -> dict:
    """Preset values, overridden by the config's explicit (not None) fields.

    The preset's edge width is capped at `hidden` (a narrow override such as `hidden=32` gets 32 edge
    channels); an explicit `edge_hidden` is used as given. The preset name and the sizes were checked
    when the config loaded (`xtalgen.schema.load_config`).
    """
    arch = dict(PRESETS[cfg.preset])
    for key in ("hidden", "num_layers", "num_rbf"):
        value = getattr(cfg, key)
        if value is not None:
            arch[key] = value
    preset_edges = min(arch["edge_hidden"], arch["hidden"])
    arch["edge_hidden"] = cfg.edge_hidden if cfg.edge_hidden is not None else preset_edges
    return arch


class ElementSetGate(nn.Module):
    """Element-wise chemical-system term of the element logits, (N, 100).

    A chemical system names elements, and a crystal of that system holds each of them at least once.
    The multi-hot through an MLP (the property embedding) must learn every element's column apart,
    and an atom's type head sees only its neighbourhood: the fine-tuned models kept the requested
    elements but often dropped one (one cation on both perovskite sites). This term treats every
    element alike, so it carries over to systems never seen in training. Per atom, two learnt gates
    from the atom's features scale two multi-hots of its structure:

        logits[i, z] += g_in(s_i) * requested[b_i, z] + g_missing(s_i) * missing[b_i, z]

    where `missing` is requested and not yet among the structure's unmasked atoms. The gates start at
    zero (weights and bias), so a model gains this term without changing its outputs, and rows given
    the null token (unconditional, guidance's other half) get nothing from it.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, hidden))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, s: Tensor, requested: Tensor, atomic_numbers: Tensor, batch_index: Tensor) -> Tensor:
        # s: (N, H); requested: (B, 100); atomic_numbers: (N,) long, 0 = mask; batch_index: (N,)
        present = requested.new_zeros(requested.shape[0], NUM_ELEMENTS + 1)  # column 0: the mask token
        present[batch_index, atomic_numbers] = 1.0
        missing = requested * (1.0 - present[:, 1:])  # (B, 100)
        gates = nn.functional.linear(s, self.weight, self.bias)  # (N, 2)
        return gates[:, :1] * requested[batch_index] + gates[:, 1:] * missing[batch_index]  # (N, 100)


class ScoreNetwork(nn.Module):
    def __init__(
        self,
        cfg: ScoreNetConfig,
        conditions: Sequence[ConditionConfig] = (),
        condition_dropout: float = 0.0,
        adapters: bool = False,
    ):
        super().__init__()
        arch = resolve_architecture(cfg)
        if cfg.backend not in available_backends():
            raise ValueError(
                f"message-passing backend {cfg.backend!r} is not registered; available: {available_backends()}"
            )
        if (reason := backend_unavailable_reason(cfg.backend)) is not None:
            raise ConfigError(f"config key 'model.score_net.backend': {reason}")
        hidden, num_layers, num_rbf = arch["hidden"], arch["num_layers"], arch["num_rbf"]
        edge_hidden = arch["edge_hidden"]
        self.cfg = cfg
        self.hidden = hidden
        self.edge_hidden = edge_hidden
        self.cutoff = float(cfg.cutoff)
        self.max_neighbors = int(cfg.max_neighbors)
        self.radius_graph = cfg.radius_graph

        self.type_embedding = nn.Embedding(NUM_ELEMENTS + 1, hidden)  # row 0 = mask token
        self.time_embedding = TimeEmbedding(hidden)
        self.conditioning = ConditionEmbedding(conditions, hidden, condition_dropout) if conditions else None
        self.rbf = GaussianRBF(num_rbf, self.cutoff)
        # The first layer sees all-zero vector features (they start at zero): no vector-to-vector term.
        self.layers = nn.ModuleList(
            [PaiNNLayer(hidden, num_rbf, edge_hidden, cfg.backend, vector_input=i > 0) for i in range(num_layers)]
        )
        self.adapters: nn.ModuleList | None = None
        self.type_adapter: nn.Linear | None = None
        # Recompute each layer in the backward pass instead of keeping its per-edge activations
        # (the large presets' memory); `train.activation_checkpointing` switches it on
        # (`xtalgen.train.parallelize.apply_activation_checkpointing`). Results are identical.
        self.activation_checkpointing = False
        # Fixed at construction: properties either shape the whole network (trained with it) or enter
        # only through adapters (fine-tuning). Adding adapters later must not change this.
        self.conditions_at_input = bool(conditions) and not adapters
        if adapters:
            self.add_adapters()

        self.final_norm = nn.LayerNorm(hidden)
        self.type_head = mlp(hidden, hidden, NUM_ELEMENTS)
        self.coord_gate = mlp(hidden, hidden, hidden)
        self.coord_out = nn.Linear(hidden, 1, bias=False)
        # The lattice head's edge MLP is per-edge work too: it runs at the edge width.
        self.edge_src = nn.Linear(hidden, edge_hidden)
        self.edge_rbf = nn.Linear(num_rbf, edge_hidden, bias=False)
        self.edge_weight = nn.Linear(edge_hidden, 1)
        self.iso_head = mlp(hidden, hidden, 1)
        # The cell term: coefficients of I and (X - I) from invariants of the structure (docstring).
        self.prior_density = DEFAULT_PRIOR_DENSITY
        self.cell_embedding = mlp(NUM_CELL_INVARIANTS, hidden, hidden)
        self.cell_head = mlp(3 * hidden, hidden, 2)
        # Last, and from zeros (no draw from the RNG): every other parameter initialises as before.
        self.element_set_conditions = [c.name for c in conditions if c.kind == "chemical_system"]
        self.element_set_gate = ElementSetGate(hidden) if self.element_set_conditions else None

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapters(self) -> None:
        """Per-layer adapters mapping the property embedding into the hidden scalars.

        The last layer of each is zero-initialised: outputs stay bit-for-bit unchanged.
        """
        if self.conditioning is None:
            raise ValueError("adapters need at least one condition (they map property embeddings)")
        if self.adapters is not None:
            return
        ref = self.type_embedding.weight
        adapters = nn.ModuleList(
            [mlp(self.hidden, self.hidden, self.hidden) for _ in self.layers]
        ).to(device=ref.device, dtype=ref.dtype)
        for adapter in adapters:
            nn.init.zeros_(adapter[-1].weight)
            nn.init.zeros_(adapter[-1].bias)
        self.adapters = adapters
        # A direct path from the properties to the element logits (zero-initialised like the rest):
        # a condition that names elements (a chemical system) then reaches the type head in one
        # linear map instead of through every layer.
        self.type_adapter = nn.Linear(self.hidden, NUM_ELEMENTS).to(device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.type_adapter.weight)
        nn.init.zeros_(self.type_adapter.bias)

    def finetune_parameters(self) -> list[nn.Parameter]:
        """Parameters trained when the base is frozen: adapters, element-set gate, property embeddings."""
        params = []
        for module in (self.adapters, self.type_adapter, self.element_set_gate, self.conditioning):
            if module is not None:
                params.extend(module.parameters())
        return params

    def freeze_base(self) -> list[nn.Parameter]:
        """requires_grad=False on everything but `finetune_parameters()`, which it returns."""
        trainable = {id(p) for p in self.finetune_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        return self.finetune_parameters()

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        atomic_numbers: Tensor,  # (N,) long, 0 = mask, 1..100
        frac_coords: Tensor,  # (N, 3)
        lattice: Tensor,  # (B, 3, 3) rows are lattice vectors, Å
        num_atoms: Tensor,  # (B,) long
        batch_index: Tensor,  # (N,) long
        t: Tensor,  # (B,) in [0, 1]
        conditions: Mapping[str, Tensor] | None = None,
        condition_mask: Mapping[str, Tensor] | None = None,
    ) -> ScoreOutput:
        dtype = self.type_embedding.weight.dtype
        # Geometry in at least float32 even for a bf16 network: bf16 positions are off by ~0.05 Å.
        geom_dtype = torch.promote_types(dtype, torch.float32)
        lattice = lattice.to(geom_dtype)
        frac = torch.remainder(frac_coords.to(geom_dtype), 1.0)  # (N, 3) image-independent
        cart = torch.einsum("ni,nij->nj", frac, lattice[batch_index])  # (N, 3)
        graph = radius_graph_pbc(cart, lattice, batch_index, num_atoms, self.cutoff, self.max_neighbors,
                                 algorithm=self.radius_graph)
        source, target = graph.edge_index
        dist = graph.edge_vec.norm(dim=1)  # (E,)
        unit_geom = graph.edge_vec / dist.clamp_min(1e-6)[:, None]  # (E, 3)
        unit_vec = unit_geom.to(dtype)
        rbf = self.rbf(dist).to(dtype)  # (E, K)

        num_structures = lattice.shape[0]
        cond = self.time_embedding(t)  # (B, H); features computed in >= float32
        props, used = None, {}
        if self.conditioning is None and conditions:
            raise ValueError(f"this network is not conditioned on any property; got {sorted(conditions)}")
        if self.conditioning is not None:
            props, used = self.conditioning.embed(num_structures, conditions, condition_mask)  # (B, H)
            if self.conditions_at_input:
                cond = cond + props

        s = self.type_embedding(atomic_numbers) + cond[batch_index]  # (N, H)
        v = s.new_zeros(s.shape[0], 3, self.hidden)  # (N, 3, H)
        for i, layer in enumerate(self.layers):
            if self.adapters is not None:
                s = s + self.adapters[i](props)[batch_index]
            args = (s, v, cond, batch_index, graph.edge_index, rbf, unit_vec)
            if self.activation_checkpointing and torch.is_grad_enabled():
                s, v = checkpoint(layer, *args, use_reentrant=False)
            else:
                s, v = layer(*args)

        s = self.final_norm(s)
        type_logits = self.type_head(s)  # (N, 100)
        if self.type_adapter is not None:
            type_logits = type_logits + self.type_adapter(props)[batch_index]
        if self.element_set_gate is not None:
            requested = self._requested_elements(conditions, used, num_structures, type_logits)  # (B, 100)
            type_logits = type_logits + self.element_set_gate(s, requested, atomic_numbers, batch_index)
        coord_vectors = self.coord_out(v * self.coord_gate(s)[:, None, :]).squeeze(-1)  # (N, 3)
        lattice_matrix = self._lattice_readout(s, rbf, unit_geom, source, target, batch_index, num_structures)
        lattice_matrix = lattice_matrix + self._cell_term(s, cond, lattice, num_atoms, batch_index)
        return ScoreOutput(type_logits, coord_vectors, lattice_matrix)

    def _requested_elements(self, conditions, used, num_structures, like: Tensor) -> Tensor:
        """(B, 100) multi-hot of the elements a chemical-system condition asks for; 0 on null rows."""
        requested = like.new_zeros(num_structures, NUM_ELEMENTS)
        for name in self.element_set_conditions:
            value = (conditions or {}).get(name)
            if value is not None:
                asked = torch.where(used[name][:, None], value.to(like.dtype), 0.0)  # NaN rows -> 0
                requested = torch.maximum(requested, asked)
        return requested

    def _lattice_readout(self, s, rbf, unit_vec, source, target, batch_index, num_structures):
        """(B, 3, 3): mean_e w_e r_hat r_hat^T + mean_atoms(iso) * I, both per structure."""
        # The H -> H_e projection runs per atom, not per edge (it is linear, so it commutes with the
        # gather): per-edge work stays O(E x H_e).
        node_proj = nn.functional.linear(s, self.edge_src.weight)  # (N, H_e)
        pair = node_proj[source] + node_proj[target] + self.edge_src.bias  # (E, H_e)
        edge_hidden = nn.functional.silu(pair * self.edge_rbf(rbf))
        weight = self.edge_weight(edge_hidden)  # (E, 1)
        # r_hat r_hat^T first: it is exactly symmetric in floating point, and so is its weighted sum.
        # Means over hundreds of edges are accumulated in at least float32 (bf16 would lose them).
        acc = torch.promote_types(s.dtype, torch.float32)
        unit = unit_vec.to(acc)
        outer = (weight.to(acc)[:, :, None] * (unit[:, :, None] * unit[:, None, :])).reshape(-1, 9)  # (E, 9)
        edge_struct = batch_index[target]  # (E,)
        aniso = outer.new_zeros(num_structures, 9).index_add_(0, edge_struct, outer)
        edges_per_struct = torch.bincount(edge_struct, minlength=num_structures).clamp_min(1)
        aniso = aniso / edges_per_struct[:, None].to(acc)

        iso_atoms = self.iso_head(s).to(acc)  # (N, 1)
        iso = iso_atoms.new_zeros(num_structures, 1).index_add_(0, batch_index, iso_atoms)
        atoms_per_struct = torch.bincount(batch_index, minlength=num_structures).clamp_min(1)
        iso = iso / atoms_per_struct[:, None].to(acc)  # (B, 1)
        eye = torch.eye(3, dtype=acc, device=s.device)
        return (aniso.view(-1, 3, 3) + iso[:, :, None] * eye).to(s.dtype)


    def _cell_term(self, s, cond, lattice, num_atoms, batch_index):
        """(B, 3, 3): c_0 I + c_1 (X - I) from the noisy cell itself (module docstring)."""
        num_structures = lattice.shape[0]
        geom = lattice.dtype  # >= float32
        prior_edge = (num_atoms.to(geom) / self.prior_density) ** (1.0 / 3.0)  # (B,) mu_N, Å
        unit_cell = lattice / prior_edge[:, None, None]  # (B, 3, 3) dimensionless
        metric = unit_cell.transpose(1, 2) @ unit_cell  # (B, 3, 3) G = L^T L / mu^2, rotates as R G R^T
        trace = metric.diagonal(dim1=1, dim2=2).sum(-1)  # (B,)
        cell_x = metric / torch.sqrt(trace / 3)[:, None, None]  # (B, 3, 3) X
        invariants = torch.stack(_cell_invariants(unit_cell, metric, trace), dim=-1)  # (B, 3)
        invariants = invariants.clamp(-CELL_INVARIANT_LIMIT, CELL_INVARIANT_LIMIT).to(s.dtype)

        atoms_per_struct = torch.bincount(batch_index, minlength=num_structures).clamp_min(1)
        pooled = s.new_zeros(num_structures, s.shape[1]).index_add_(0, batch_index, s)
        pooled = pooled / atoms_per_struct[:, None].to(s.dtype)  # (B, H) mean atom scalars
        features = torch.cat([pooled, cond, self.cell_embedding(invariants)], dim=-1)  # (B, 3H)
        coeff = self.cell_head(features).to(geom)  # (B, 2)
        eye = torch.eye(3, dtype=geom, device=lattice.device)
        term = coeff[:, 0, None, None] * eye + coeff[:, 1, None, None] * (cell_x - eye)
        return (0.5 * (term + term.transpose(1, 2))).to(s.dtype)  # exactly symmetric


def _cell_invariants(unit_cell: Tensor, metric: Tensor, trace: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rotation-invariant measures of a cell in units of the prior's cube edge, each (B,).

    log_scale: log of the linear scale against the prior's cube, log(V / (N / rho)) / 3 (0 at the
    prior's density); anisotropy: log(tr(G)/3) - log(det G)/3 >= 0 (AM-GM, 0 for a cube);
    spread: 3 tr(G^2) / tr(G)^2 - 1 in [0, 2] (0 when the three lattice vectors' lengths agree).
    """
    log_volume = torch.log(torch.linalg.det(unit_cell).abs().clamp_min(1e-30))  # log(V / mu^3)
    log_scale = log_volume / 3
    anisotropy = torch.log(trace / 3) - 2 * log_volume / 3
    spread = 3 * (metric * metric).sum((-1, -2)) / trace.square() - 1
    return log_scale, anisotropy, spread


def build_score_net(
    cfg: ScoreNetConfig,
    conditions: Sequence[ConditionConfig] = (),
    condition_dropout: float = 0.0,
    adapters: bool = False,
) -> ScoreNetwork:
    return ScoreNetwork(cfg, conditions, condition_dropout, adapters)


def compile_layers(net: ScoreNetwork) -> ScoreNetwork:
    """`torch.compile` each interaction layer in place (inductor; `sample.compile`); returns `net`.

    Only the layers: their per-edge gathers, filters and scatters are many small elementwise
    operations that inductor fuses into a few loops (1.8x fewer CPU-seconds per sampled structure
    on the `debug` preset; benchmarks/RESULTS.md). The radius graph, whose shapes depend on the
    data, stays eager. `dynamic=True`: the edge count changes at every step, and one compilation
    must serve them all. Compiling takes tens of seconds once per process (a C++ compiler on CPU,
    Triton on GPU), so it pays off over hundreds of structures, not a handful. Outputs agree with
    the eager network to float rounding (tested), not bit for bit.
    """
    for layer in net.layers:
        layer.compile(dynamic=True)
    return net


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def preset_parameter_count(preset: str) -> int:
    """Real parameter count of a preset, built on the meta device (no memory, even for xl)."""
    with torch.device("meta"):
        return count_parameters(ScoreNetwork(ScoreNetConfig(preset=preset)))


def format_count(n: int) -> str:
    exponent = min(int(math.log10(max(n, 1)) // 3), 3)
    return f"{n / 10 ** (3 * exponent):.1f}{['', 'K', 'M', 'B'][exponent]}"
