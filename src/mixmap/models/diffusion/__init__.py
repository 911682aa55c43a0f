"""Diffusion signal models: signals over b-values and gradient directions."""
