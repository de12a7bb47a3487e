"""Pictures of what the model learns, as HWC uint8 arrays for TensorBoard and PNG files.

- MAE reconstructions: per sample and modality, the input, the input with its masked positions dropped, and
  the model's reconstruction (images side by side; video as rows of frames; audio as log-magnitude
  spectrograms stacked top to bottom).
- Position embeddings: the first three principal components of each modality's learned [M, E] position
  encoding as red, green and blue, laid out on the input grid (image H x W; video frames side by side;
  audio as a strip over time).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

MIN_SIDE = 96            # small inputs (8x8 digits) are enlarged (nearest neighbour) to at least this
AUDIO_STRIP = (32, 1024)  # height and most width of an audio position-embedding strip
_GAP = 2                 # pixels between panels


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Normalised [-1, 1] values -> uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def enlarge(picture: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement of a [H, W, 3] picture so its shorter side is at least MIN_SIDE."""
    factor = max(1, -(-MIN_SIDE // min(picture.shape[:2])))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def side_by_side(panels: list[np.ndarray], axis: int = 1) -> np.ndarray:
    """Concatenates [H, W, 3] panels with white gaps (axis 1: left to right, 0: top to bottom)."""
    out = []
    for i, panel in enumerate(panels):
        if i:
            gap_shape = list(panel.shape)
            gap_shape[axis] = _GAP
            out.append(np.full(gap_shape, 255, np.uint8))
        out.append(panel)
    return np.concatenate(out, axis=axis)


def spectrogram(audio: torch.Tensor) -> np.ndarray:
    """[S] samples in [-1, 1] -> a [F, frames, 3] grey log-magnitude spectrogram, low frequencies at the bottom."""
    n_fft = int(min(512, max(16, 2 ** round(np.log2(max(16, audio.numel() // 32))))))
    window = torch.hann_window(n_fft)
    magnitude = torch.stft(audio.float().cpu(), n_fft, hop_length=n_fft // 4, window=window,
                           return_complex=True).abs()
    decibels = 20 * torch.log10(magnitude + 1e-5)
    scaled = ((decibels - decibels.max() + 80) / 80).clamp(0, 1).flip(0)       # an 80 dB range
    grey = (scaled * 255).round().byte().numpy()
    return np.repeat(grey[:, :, None], 3, axis=2)


def _panel(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray | None:
    """One modality's [M, C] values as a picture, or None if it has no picture layout."""
    if name == "audio" or (len(shape) == 1 and x.shape[-1] == 1):
        return enlarge(spectrogram(x[:, 0]))
    if len(shape) == 3:                                        # image [H, W, C]
        height, width, channels = shape
        return enlarge(_rgb(to_uint8(x).reshape(height, width, channels)))
    if len(shape) == 4:                                        # video [T, H, W, C]
        frames, height, width, channels = shape
        video = _rgb(to_uint8(x).reshape(frames, height, width, channels))
        return side_by_side([enlarge(frame) for frame in video])
    return None


def _rgb(picture: np.ndarray) -> np.ndarray:
    return picture if picture.shape[-1] == 3 else np.repeat(picture[..., :1], 3, axis=-1)


def reconstruction_pictures(inputs: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                            reconstruction: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                            count: int) -> dict[str, np.ndarray]:
    """{"mae/<modality>/<i>": picture} for the first `count` samples.

    Args:
        inputs: {name: [B, M, C]} normalised inputs (unmasked).
        masks: {name: bool [B, M]}, True where the content was dropped.
        reconstruction: {name: [B, M, C]} the model's output on the masked inputs.
        shapes: stored shape of each modality (its picture layout).
        count: samples to draw.
    """
    pictures = {}
    for name, mask in masks.items():
        for i in range(min(count, mask.shape[0])):
            x = inputs[name][i]
            masked = x.masked_fill(mask[i].unsqueeze(-1), 0)
            panels = [_panel(name, t, tuple(shapes[name])) for t in (x, masked, reconstruction[name][i])]
            if panels[0] is None:
                continue
            axis = 0 if name in ("audio", "video") else 1
            pictures[f"mae/{name}/{i}"] = side_by_side(panels, axis=axis)
    return pictures


def principal_colours(embedding: torch.Tensor) -> np.ndarray:
    """[M, E] -> [M, 3] uint8: the first three principal components, each scaled to its 1st-99th percentile."""
    centred = embedding.float().cpu() - embedding.float().cpu().mean(dim=0)
    _, _, vectors = torch.linalg.svd(centred, full_matrices=False)
    components = centred @ vectors[:3].T                                      # [M, <= 3]
    if components.shape[1] < 3:
        components = torch.cat([components, components.new_zeros(components.shape[0], 3 - components.shape[1])], 1)
    low = torch.quantile(components, 0.01, dim=0)
    high = torch.quantile(components, 0.99, dim=0)
    scaled = ((components - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    return (scaled * 255).round().byte().numpy()


def position_embedding_pictures(encodings: Mapping[str, torch.Tensor],
                                shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """{"position_embedding/<modality>": picture} from each modality's position encoding [M, E]."""
    pictures = {}
    for name, encoding in encodings.items():
        shape = tuple(shapes[name])
        colours = principal_colours(encoding)
        if len(shape) == 3:
            pictures[f"position_embedding/{name}"] = enlarge(colours.reshape(shape[0], shape[1], 3))
        elif len(shape) == 4:
            frames = colours.reshape(shape[0], shape[1], shape[2], 3)
            pictures[f"position_embedding/{name}"] = side_by_side([enlarge(f) for f in frames])
        else:
            height, most = AUDIO_STRIP
            width = min(most, colours.shape[0])
            pooled = colours[: colours.shape[0] // width * width].reshape(width, -1, 3).mean(axis=1)
            pictures[f"position_embedding/{name}"] = np.repeat(pooled[None].round().astype(np.uint8), height, 0)
    return pictures
