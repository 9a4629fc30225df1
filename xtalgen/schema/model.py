"""Config of the score network and the diffusion processes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ScoreNetConfig:
    preset: str = "debug"  # debug | base | large | xl; explicit fields below override when > 0
    hidden: int = 0
    num_layers: int = 0
    num_rbf: int = 0
    edge_hidden: int = 0  # channels of the per-edge message (0 = the preset's, at most `hidden`)
    cutoff: float = 7.0  # Å, MatterGen
    max_neighbors: int = 50  # MatterGen
    backend: str = "torch"  # torch (reference, CPU) | triton (fused GPU)


@dataclass
class ConditionConfig:
    """One property the model is conditioned on."""

    name: str = ""
    kind: str = "scalar"  # scalar | categorical | chemical_system | space_group
    num_classes: int = 0  # categorical only


@dataclass
class DiffusionConfig:
    num_steps: int = 1000  # discrete steps of the type process
    coord_sigma_min: float = 0.01
    coord_sigma_max: float = 5.0
    lattice_beta_min: float = 0.1
    lattice_beta_max: float = 20.0
    lattice_density: float = 0.0  # atoms/Å³; 0 = from the shard manifest
    type_vb_weight: float = 0.01  # hybrid loss: CE + weight * variational bound
    loss_weight_lattice: float = 1.0
    loss_weight_coords: float = 0.1
    loss_weight_types: float = 1.0


@dataclass
class ModelConfig:
    score_net: ScoreNetConfig = field(default_factory=ScoreNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    conditions: list[ConditionConfig] = field(default_factory=list)
    condition_dropout: float = 0.2
    adapters: bool = False
