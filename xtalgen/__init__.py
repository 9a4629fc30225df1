"""xtalgen: train diffusion models that generate inorganic crystals."""

__version__ = "0.1.0"
