"""Random draws made where their generator lives.

The posterior maps draw about a thousand million numbers for a whole brain (384 draws per
voxel). On the CPU they come from a seeded CPU generator, as they always have, so a CPU fit is
reproducible to the bit. On a CUDA device the maps' generator lives on the device
(:func:`draw_generator`): made on the CPU and copied over, the same draws cost about 15 s of
one CPU core (148 M normals per second measured here), a quarter of a whole-brain GPU budget.
Each helper makes its draws on ``generator.device`` and returns them on the device of the
tensors they are for, so every call site works with either kind of generator.
"""

from __future__ import annotations

import torch


def draw_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator seeded with ``seed``: on ``device`` where it is a CUDA device, else on the
    CPU (CPU fits as before; Apple's MPS keeps the CPU generator)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.Generator(device=dev).manual_seed(int(seed))
    return torch.Generator().manual_seed(int(seed))


def randn(shape: tuple[int, ...], generator: torch.Generator,
          device: torch.device) -> torch.Tensor:
    """Standard normal draws of ``shape`` on ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def rand(shape: tuple[int, ...], generator: torch.Generator,
         device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` on ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def multinomial(probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices per row of ``probs`` (rows need not sum to one), with replacement, on
    the device of ``probs``."""
    return torch.multinomial(probs.to(generator.device), int(n), replacement=True,
                             generator=generator).to(probs.device)
