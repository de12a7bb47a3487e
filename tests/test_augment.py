"""Augmentation on the device (hipscale.augment): what each operation does, and that the same seed parts
draw the same augmentation (the trainer seeds them with run seed, rank, step and micro-step, so a resumed step
repeats it; tests/test_train_distributed.py checks that end to end with configs/debug.yaml's recipe)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hipscale.augment import AugmentError, Augmentation
from hipscale.config import ConfigError, load_config
from hipscale.config.schema import AugmentConfig
from train_helpers import CONFIG

H, W, K = 8, 6, 5


def images(batch: int = 6) -> torch.Tensor:
    """[B, H*W, 3] in [-1, 1], every pixel distinct."""
    return torch.linspace(-1, 1, batch * H * W * 3).view(batch, H * W, 3)


def augmentation(**options) -> Augmentation:
    return Augmentation(dataclasses.replace(AugmentConfig(), **options), {"image": (H, W, 3)}, None, K)


def grid(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], H, W, 3)


ALL_IMAGE_OPS = dict(random_resized_crop=True, horizontal_flip=True, color_ops=2, mixup_alpha=0.4,
                     cutmix_alpha=1.0, label_smoothing=0.1)


def test_the_same_seed_parts_draw_the_same_augmentation_and_other_steps_differ():
    aug = augmentation(**ALL_IMAGE_OPS)
    labels = torch.arange(6) % K
    a, ta = aug.train({"image": images()}, labels, 0, 1, 7, 0)
    b, tb = aug.train({"image": images()}, labels, 0, 1, 7, 0)
    assert torch.equal(a["image"], b["image"]) and torch.equal(ta, tb)
    others = [aug.train({"image": images()}, labels, *parts)[0]["image"] for parts in
              ((0, 1, 8, 0), (0, 0, 7, 0), (0, 1, 7, 1), (1, 1, 7, 0))]  # step, rank, micro-step, run seed
    assert all(not torch.equal(a["image"], o) for o in others)
    assert not torch.equal(a["image"], images())


def test_a_flip_mirrors_exactly_and_a_full_size_crop_is_the_identity():
    x = images()
    flipped, _ = augmentation(horizontal_flip=True).train({"image": x}, torch.zeros(6, dtype=torch.long), 0, 0, 0, 0)
    mirrored = [torch.allclose(grid(flipped["image"])[i], grid(x)[i].flip(1), atol=1e-6) for i in range(6)]
    kept = [torch.allclose(grid(flipped["image"])[i], grid(x)[i], atol=1e-6) for i in range(6)]
    assert all(m != k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    same, _ = augmentation(random_resized_crop=True, crop_scale=(1.0, 1.0), crop_ratio=(W / H, W / H)).train(
        {"image": x}, torch.zeros(6, dtype=torch.long), 0, 0, 0, 0)
    torch.testing.assert_close(same["image"], x, atol=1e-5, rtol=0)


def test_a_small_crop_magnifies_one_region():
    x = grid(images(1)).clone()
    x[0, :, :, :] = torch.linspace(-1, 1, W).view(1, W, 1)     # a horizontal ramp
    out, _ = augmentation(random_resized_crop=True, crop_scale=(0.1, 0.1)).train(
        {"image": x.reshape(1, H * W, 3)}, torch.zeros(1, dtype=torch.long), 0, 0, 0, 0)
    spread = grid(out["image"])[0, 0, :, 0]
    assert float(spread[-1] - spread[0]) < 0.8 * 2 * (W - 1) / W   # the ramp stretched: a narrower range shown
    assert torch.all(spread[1:] >= spread[:-1] - 1e-6)              # still a ramp, left to right


def test_colour_operations_stay_in_range_and_change_images():
    x = images()
    out, _ = augmentation(color_ops=3, color_magnitude=9).train({"image": x}, torch.zeros(6, dtype=torch.long), 0, 0, 0, 0)
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    changed = [not torch.allclose(out["image"][i], x[i]) for i in range(6)]
    assert sum(changed) >= 4


def test_mixup_blends_samples_with_the_reversed_batch_and_their_targets_alike():
    x = images()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out, targets = augmentation(mixup_alpha=0.4).train({"image": x}, labels, 0, 0, 3, 0)
    one_hot = torch.nn.functional.one_hot(labels, K).float()
    lam = float(targets[1, 1])                                    # sample 1 (class 1) pairs with sample 4 (class 4)
    torch.testing.assert_close(targets, one_hot * lam + one_hot.flip(0) * (1 - lam))
    torch.testing.assert_close(out["image"], x * lam + x.flip(0) * (1 - lam))
    assert 0 < lam < 1


def test_cutmix_pastes_a_box_of_the_partner_and_weights_targets_by_its_area():
    x = images()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out, targets = augmentation(cutmix_alpha=1.0).train({"image": x}, labels, 0, 0, 5, 0)
    from_partner = (grid(out["image"]) == grid(x.flip(0))).all(dim=-1)[0]   # [H, W] of sample 0
    kept = (grid(out["image"]) == grid(x)).all(dim=-1)[0]
    assert bool((from_partner | kept).all()) and 0 < int(from_partner.sum()) < H * W
    covered = float(from_partner.float().mean())
    assert float(targets[1, 1]) == pytest.approx(1 - covered) and float(targets[1, 4]) == pytest.approx(covered)


def test_label_smoothing_and_multi_label_targets():
    aug = augmentation(label_smoothing=0.1)
    _, targets = aug.train({"image": images(2)}, torch.tensor([1, 3]), 0, 0, 0, 0)
    assert targets[0, 1] == pytest.approx(0.9 + 0.1 / K) and targets[0, 0] == pytest.approx(0.1 / K)
    multi = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])
    _, targets = aug.train({"image": images(2)}, multi, 0, 0, 0, 0)
    torch.testing.assert_close(targets, multi * 0.9 + 0.1 / K)
    plain = augmentation()
    labels = torch.tensor([1, 3])
    assert plain.train({"image": images(2)}, labels, 0, 0, 0, 0)[1] is labels   # nothing on: labels untouched


def clip(batch: int, frames: int = 4, samples_per_frame: int = 3) -> dict[str, torch.Tensor]:
    """Video [B, T*2*2, 3] and audio [B, S, 1] whose values are the frame index (+ 100 * sample)."""
    video = torch.arange(frames).repeat_interleave(4).view(1, frames * 4, 1).expand(batch, -1, 3).float()
    audio = (torch.arange(frames).repeat_interleave(samples_per_frame).view(1, -1, 1).float()
             + 100 * torch.arange(batch).view(batch, 1, 1))
    return {"video": video.clone(), "audio": audio}


def test_a_clip_window_takes_aligned_consecutive_frames_and_audio_at_random_and_the_centre_for_eval():
    shapes = {"video": (4, 2, 2, 3), "audio": (12,)}
    aug = Augmentation(dataclasses.replace(AugmentConfig(), clip_seconds=1.0), shapes, 2.0, K)
    assert aug.model_modalities == {"video": (8, 3), "audio": (6, 1)}
    starts = set()
    for step in range(12):
        out, _ = aug.train(clip(3), torch.zeros(3, K), 0, 0, step, 0)
        for b in range(3):
            frames = out["video"][b, ::4, 0]
            first = int(frames[0])
            assert frames.tolist() == [first, first + 1]                   # consecutive frames
            assert (out["audio"][b, :, 0] - 100 * b).tolist() == [first] * 3 + [first + 1] * 3  # their audio
            starts.add(first)
    assert starts == {0, 1, 2}
    centre = aug.evaluation(clip(2))
    assert centre["video"][:, ::4, 0].tolist() == [[1, 2], [1, 2]]


def test_options_the_data_cannot_take_are_refused_naming_the_key():
    with pytest.raises(AugmentError, match="clip_seconds: 0.7 s is not a whole number of the stored frames"):
        Augmentation(dataclasses.replace(AugmentConfig(), clip_seconds=0.7), {"video": (4, 2, 2, 3)}, 2.0, K)
    with pytest.raises(AugmentError, match="longer than the 2.0 s clips"):
        Augmentation(dataclasses.replace(AugmentConfig(), clip_seconds=3.0), {"audio": (12,)}, 2.0, K)
    with pytest.raises(AugmentError, match="cutmix_alpha: needs an 'image' modality"):
        Augmentation(dataclasses.replace(AugmentConfig(), cutmix_alpha=1.0), {"audio": (12,)}, 2.0, K)
    with pytest.raises(ConfigError, match=r"augment.crop_scale: must be \[low, high\]"):
        load_config(CONFIG, ["augment.crop_scale=[0.5, 0.2]"])
    with pytest.raises(ConfigError, match="augment.clip_seconds: needs audio/video shards"):
        load_config(CONFIG, ["data.source=synthetic", "augment.clip_seconds=1.0"])


def test_the_trainer_refuses_image_augmentation_for_audio_data_before_training():
    from hipscale.data.loading.synthetic_loader import synthetic_info
    from hipscale.training.model_setup import build_augmentation

    config = load_config(CONFIG, ["data.source=synthetic", "data.synthetic.modalities={audio: [64, 1]}"])
    with pytest.raises(ConfigError, match=r"^augment.random_resized_crop: needs an 'image' modality stored as "
                                          r"\[H, W, C\]; the data holds audio \[64, 1\]"):
        build_augmentation(config, synthetic_info(config.data.synthetic))
