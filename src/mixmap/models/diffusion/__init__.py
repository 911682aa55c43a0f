"""Diffusion signal models: signals over b-values and gradient directions."""

from mixmap.models.diffusion.base import DiffusionModel

__all__ = ["DiffusionModel"]
