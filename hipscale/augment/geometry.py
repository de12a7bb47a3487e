"""Random resized crops and horizontal flips of a batch of images, in one grid_sample."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_and_flip(images: torch.Tensor, generator: torch.Generator, scale: tuple[float, float],
                  ratio: tuple[float, float], crop: bool, flip: bool) -> torch.Tensor:
    """Per sample: a random crop resized back to H x W (bilinear) and/or a left-right mirror.

    A crop covers an area fraction a ~ U(scale) of the image with aspect ratio r (width / height in pixels,
    log-uniform in `ratio`): width fraction sqrt(a r H / W), height fraction sqrt(a W / (r H)), each at most
    1, at a uniform position inside the image.

    Args:
        images: [B, C, H, W] float.
        generator: RNG on the images' device.
        scale, ratio: ranges of the crop's area fraction and aspect ratio.
        crop, flip: which of the two to apply.

    Returns:
        [B, C, H, W], same dtype.
    """
    b = images.shape[0]
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=device) * (high - low) + low

    ones = torch.ones(b, device=device)
    width, height, x, y = ones, ones, ones * 0, ones * 0
    if crop:
        area = uniform(*scale)
        aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]))) * images.shape[2] / images.shape[3]
        width = torch.sqrt(area * aspect).clamp(max=1.0)
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        x = (torch.rand(b, generator=generator, device=device) * 2 - 1) * (1 - width)   # crop centre in [-1, 1]
        y = (torch.rand(b, generator=generator, device=device) * 2 - 1) * (1 - height)
    mirror = ones
    if flip:
        mirror = torch.where(torch.rand(b, generator=generator, device=device) < 0.5, -1.0, 1.0)
    zeros = torch.zeros(b, device=device)
    theta = torch.stack([torch.stack([width * mirror, zeros, x], dim=1),
                         torch.stack([zeros, height, y], dim=1)], dim=1)                # [B, 2, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).to(images.dtype)
