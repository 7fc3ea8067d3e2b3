"""cosed: Contrastive Sequential Diffusion for step-by-step instructional videos."""

__version__ = "0.1.0"
