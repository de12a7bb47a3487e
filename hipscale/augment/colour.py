"""RandAugment-style colour operations on a batch of images, each sample drawing its own."""
from __future__ import annotations

import torch

_LUMA = (0.299, 0.587, 0.114)


def _grey(v: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma (a single channel is its own grey)."""
    if v.shape[1] != 3:
        return v.mean(dim=1, keepdim=True)
    weights = torch.tensor(_LUMA, device=v.device, dtype=v.dtype).view(1, 3, 1, 1)
    return (v * weights).sum(dim=1, keepdim=True)


def _autocontrast(v: torch.Tensor) -> torch.Tensor:
    low = v.amin(dim=(2, 3), keepdim=True)
    high = v.amax(dim=(2, 3), keepdim=True)
    return torch.where(high > low, (v - low) / (high - low).clamp_min(1e-6), v)


def _posterize(v: torch.Tensor, magnitude: float) -> torch.Tensor:
    step = 2 ** round(4 * magnitude)   # keep 8 - 4m bits
    return torch.floor(v * 255 / step) * step / 255


# name -> (v [B, C, H, W] in [0, 1], factor [B, 1, 1, 1] = 1 +- 0.9 m, m in [0, 1]) -> same
OPERATIONS = {
    "identity": lambda v, f, m: v,
    "brightness": lambda v, f, m: v * f,
    "contrast": lambda v, f, m: (v - _grey(v).mean(dim=(2, 3), keepdim=True)) * f
    + _grey(v).mean(dim=(2, 3), keepdim=True),
    "saturation": lambda v, f, m: (v - _grey(v)) * f + _grey(v),
    "solarize": lambda v, f, m: torch.where(v >= 1 - m, 1 - v, v),
    "posterize": lambda v, f, m: _posterize(v, m),
    "autocontrast": lambda v, f, m: _autocontrast(v),
}


def random_colour(images: torch.Tensor, generator: torch.Generator, num_ops: int, magnitude: float) -> torch.Tensor:
    """Applies `num_ops` colour operations in a row, each drawn uniformly per sample from :data:`OPERATIONS`.

    Args:
        images: [B, C, H, W] in [-1, 1].
        generator: RNG on the images' device.
        num_ops: operations per sample (RandAugment's N).
        magnitude: strength on RandAugment's 0-10 scale (its M): factors 1 +- 0.09 M (the sign drawn per
            sample), solarize above 1 - M / 10, posterize to 8 - round(0.4 M) bits.

    Returns:
        [B, C, H, W] in [-1, 1].
    """
    b = images.shape[0]
    m = magnitude / 10.0
    v = (images.float() + 1) / 2
    ops = list(OPERATIONS.values())
    for _ in range(num_ops):
        chosen = torch.randint(0, len(ops), (b,), generator=generator, device=images.device)
        sign = torch.where(torch.rand(b, generator=generator, device=images.device) < 0.5, -1.0, 1.0)
        factor = (1 + 0.9 * m * sign).view(b, 1, 1, 1)
        out = v
        for index, op in enumerate(ops[1:], start=1):
            out = torch.where((chosen == index).view(b, 1, 1, 1), op(v, factor, m), out)
        v = out.clamp(0, 1)
    return (v * 2 - 1).to(images.dtype)
