"""The resize policy shared by video frames and images."""
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_POLICY = "EXIF orientation, RGB, bicubic scale of the shorter side to size, centre crop"


def resize_and_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Scales an image to cover ``height x width``, then crops the centre.

    The scale factor is ``max(height / h, width / w)``, so for a square target
    the shorter side becomes the target side; resampling is bicubic (with
    PIL's antialiasing when shrinking). An image already of the target size
    is returned unchanged. The crop drops ``(excess // 2)`` pixels at the
    top/left and the rest at the bottom/right.

    Args:
        image: Any PIL image; converted to RGB.
        height: Target height H.
        width: Target width W.

    Returns:
        ``[H, W, 3]`` uint8.
    """
    image = image.convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def load_image(path: Path | BinaryIO, height: int, width: int) -> tuple[np.ndarray, list[int]]:
    """Reads an image file (a path, or a stream of its bytes) as the image sharder stores it: EXIF
    orientation applied, RGB, then :func:`resize_and_crop` (:data:`IMAGE_POLICY`).

    Returns:
        ``([H, W, 3] uint8, [source width, source height])``.

    Raises:
        Exception: PIL's errors on an unreadable file (``OSError``, ``SyntaxError``, ...).
    """
    with Image.open(path) as image:
        source_size = list(image.size)
        return resize_and_crop(ImageOps.exif_transpose(image), height, width), source_size
