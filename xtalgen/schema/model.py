"""Config of the score network and the diffusion processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Preset = Literal["debug", "base", "large", "xl"]
ConditionKind = Literal["scalar", "categorical", "chemical_system", "space_group"]
# Sizes of the network that a preset gives unless set here (None: the preset's).
PRESET_FIELDS = ("hidden", "num_layers", "num_rbf", "edge_hidden")


@dataclass
class ScoreNetConfig:
    preset: Preset = "debug"  # explicit sizes below (not None) override the preset's
    hidden: int | None = None
    num_layers: int | None = None
    num_rbf: int | None = None
    edge_hidden: int | None = None  # channels of the per-edge message (None: the preset's, at most `hidden`)
    cutoff: float = 7.0  # Å, MatterGen
    max_neighbors: int = 50  # MatterGen
    # torch (reference, CPU) | triton (fused GPU) | any name given to
    # `models.graph.register_message_passing_backend` (a registry, so not a fixed list here)
    backend: str = "torch"
    # periodic radius graph: sphere (lattice images inside each pair's cutoff sphere; the default,
    # fastest on CPU) | cell_list (binned images, 27-bin stencil; the usual GPU choice). Same edges.
    radius_graph: Literal["sphere", "cell_list"] = "sphere"

    def __post_init__(self):
        # Configs and model files written before these sizes were optional said 0 for "the preset's".
        for key in PRESET_FIELDS:
            if getattr(self, key) == 0:
                setattr(self, key, None)


@dataclass
class ConditionConfig:
    """One property the model is conditioned on."""

    name: str = ""
    kind: ConditionKind = "scalar"
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


def validate_model(model: ModelConfig, fail) -> None:
    """What the types cannot check; `fail(key, message)` makes the exception to raise."""
    for key in PRESET_FIELDS:
        value = getattr(model.score_net, key)
        if value is not None and value < 1:
            raise fail(f"model.score_net.{key}", f"must be >= 1, or null for the preset's, got {value}")
