"""The pictures the trainer writes at every evaluation (hipscale.training.components.pictures); that they reach the
TensorBoard event files and the run folder is checked by tests/test_train_distributed.py."""
from __future__ import annotations

import numpy as np
import torch

from hipscale.training.components.pictures import (MIN_SIDE, enlarge, position_embedding_pictures, principal_colours,
                                                   reconstruction_pictures)

H, W = 6, 8


def test_the_first_principal_component_of_a_grid_embedding_follows_its_main_axis():
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    embedding = torch.stack([3 * x, y, torch.zeros_like(x), torch.zeros_like(x)], dim=-1).reshape(H * W, 4)
    red = principal_colours(embedding).reshape(H, W, 3)[..., 0].astype(int)
    assert (red == red[:1]).all()                                  # constant down each column (same x)
    steps = np.diff(red[0])
    assert (steps > 0).all() or (steps < 0).all()                  # monotonic across the columns
    picture = position_embedding_pictures({"image": embedding}, {"image": (H, W, 3)})["position_embedding/image"]
    assert picture.shape == (H * -(-MIN_SIDE // H), W * -(-MIN_SIDE // H), 3) and picture.dtype == np.uint8
    audio = position_embedding_pictures({"audio": torch.randn(5000, 4)}, {"audio": (5000,)})["position_embedding/audio"]
    assert audio.shape == (32, 1024, 3)


def test_a_reconstruction_picture_shows_input_masked_input_and_output_side_by_side():
    inputs = torch.rand(2, H * W, 3) * 2 - 1
    masks = torch.zeros(2, H * W, dtype=torch.bool)
    masks[:, ::3] = True
    output = torch.zeros(2, H * W, 3)
    pictures = reconstruction_pictures({"image": inputs}, {"image": masks}, {"image": output}, {"image": (H, W, 3)}, 4)
    assert sorted(pictures) == ["mae/image/0", "mae/image/1"]
    picture = pictures["mae/image/1"]
    factor = -(-MIN_SIDE // H)
    width = W * factor
    original, masked, reconstructed = (picture[:, i * (width + 2):i * (width + 2) + width] for i in range(3))
    expected = enlarge(((inputs[1].reshape(H, W, 3) + 1) * 127.5).round().byte().numpy())
    assert np.array_equal(original, expected)
    dropped = enlarge(masks[1].reshape(H, W, 1).numpy().repeat(3, axis=2))
    assert (masked[dropped] == 128).all() and np.array_equal(masked[~dropped], expected[~dropped])
    assert (reconstructed == 128).all()                            # an all-zero output is mid-grey
    assert (picture[:, width:width + 2] == 255).all()              # a white gap between panels


def test_an_audio_reconstruction_is_drawn_as_spectrograms_with_the_tone_where_it_belongs():
    rate, tone = 8000, 1000.0
    t = torch.arange(4096) / rate
    audio = (0.5 * torch.sin(2 * torch.pi * tone * t)).view(1, -1, 1)
    pictures = reconstruction_pictures({"audio": audio}, {"audio": torch.zeros(1, 4096, dtype=torch.bool)},
                                       {"audio": audio}, {"audio": (4096,)}, 1)
    picture = pictures["mae/audio/0"]
    rows = (picture.shape[0] - 4) // 3                            # three spectrograms stacked, 2-pixel gaps
    first = picture[:rows, :, 0].astype(float)
    brightest = 1 - first.mean(axis=1).argmax() / (rows - 1)      # row 0 is the highest frequency
    assert abs(brightest - tone / (rate / 2)) <= 2 / rows
