"""Masking, losses and the analytic FLOP counter."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hipscale.model import build_hip
from hipscale.model.flops import forward_flops_per_sample, training_flops_per_sample
from hipscale.training.losses import classification_loss, masked_reconstruction_loss
from hipscale.training.masking import mask_inputs, sample_group_mask
from model_helpers import FIVE_BLOCKS, random_inputs

SPEC = {"image": (45, 3), "audio": (29, 1)}


def test_group_mask_has_exact_ratio_and_same_pattern_in_every_group():
    model = build_hip(FIVE_BLOCKS, SPEC)
    masks = sample_group_mask(model, batch_size=3, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    for layout in model.grouper.layouts:
        mask = masks[layout.name]
        assert mask.shape == (3, layout.index_dim) and mask.dtype == torch.bool
        length = layout.positions_per_group
        pattern = mask[:, :length]
        assert torch.equal(mask, pattern.repeat(1, layout.num_groups)[:, :layout.index_dim])  # every group
        assert (pattern.sum(-1) == round(0.5 * length)).all()                                # exact ratio
    assert not torch.equal(masks["image"][0], masks["image"][1])                  # random per example


def test_mask_inputs_and_loss_only_count_masked_positions():
    model = build_hip(FIVE_BLOCKS, SPEC)
    inputs = random_inputs(SPEC, 2)
    masks = sample_group_mask(model, 2, 0.75, generator=torch.Generator().manual_seed(1))
    masked = mask_inputs(inputs, masks)
    for name, mask in masks.items():
        assert not masked[name][mask].any() and torch.equal(masked[name][~mask], inputs[name][~mask])
    assert masked_reconstruction_loss(inputs, inputs, masks) == 0
    wrong_where_visible = {k: torch.where(masks[k].unsqueeze(-1), v, v + 5) for k, v in inputs.items()}
    assert masked_reconstruction_loss(wrong_where_visible, inputs, masks) == 0
    off_by_one = {k: v + 1 for k, v in inputs.items()}
    assert masked_reconstruction_loss(off_by_one, inputs, masks).item() == pytest.approx(1.0)


def test_per_sample_reconstruction_losses_and_eval_masks_that_follow_the_key():
    from hipscale.training.masking import sample_masks_by_key as sample_masks

    model = build_hip(FIVE_BLOCKS, SPEC)
    inputs = random_inputs(SPEC, 4)
    reconstruction = {k: v + torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in inputs.items()}
    keys = ["a", "b", "c", "d"]
    masks = sample_masks(model, keys, 0.75, seed=3, device=torch.device("cpu"))
    per_sample = masked_reconstruction_loss(reconstruction, inputs, masks, per_sample=True)
    assert per_sample.shape == (4,) and len(set(per_sample.tolist())) == 4
    for i in range(4):  # each is the loss of that sample alone
        alone = masked_reconstruction_loss({k: v[i:i + 1] for k, v in reconstruction.items()},
                                           {k: v[i:i + 1] for k, v in inputs.items()},
                                           {k: v[i:i + 1] for k, v in masks.items()})
        assert per_sample[i].item() == pytest.approx(alone.item(), rel=1e-6)
    # A sample's eval mask depends on its key and the seed only, not on its slot or batch.
    moved = sample_masks(model, ["d", "x", "a"], 0.75, seed=3, device=torch.device("cpu"))
    for name in masks:
        assert torch.equal(moved[name][0], masks[name][3]) and torch.equal(moved[name][2], masks[name][0])
    other_seed = sample_masks(model, keys, 0.75, seed=4, device=torch.device("cpu"))
    assert not torch.equal(other_seed["image"], masks["image"])


def test_classification_losses():
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    assert classification_loss(logits, torch.tensor([0, 1]), multi_label=False) < 1e-3
    assert classification_loss(logits, torch.tensor([1, 0]), multi_label=False) > 10
    assert classification_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), multi_label=True) < 1e-3
    with pytest.raises(ValueError, match="multi-hot"):
        classification_loss(logits, torch.tensor([0, 1]), multi_label=True)


@pytest.mark.parametrize("labels, projection", [(None, None), ({"label": (1, 10)}, 5)])
def test_flop_counter_matches_torch_flop_counter(labels, projection):
    model = build_hip(FIVE_BLOCKS, SPEC, labels, num_position_encoding_channels=projection).eval()
    batch = random_inputs({**SPEC, **(labels or {})}, batch=2)
    # The math kernel runs attention as matmuls that the counter sees (the fused CPU one it skips).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(batch)
    once_per_batch = 2 * sum(m for m, _ in SPEC.values()) * 4 * 4 if projection else 0
    assert forward_flops_per_sample(model) * 2 + once_per_batch == counter.get_total_flops()
    # A training step as torch counts it, forward and backward (the backward of the first projection skips the
    # gradient of the raw inputs; the once-per-batch work is counted per sample): within 0.5%.
    model.train()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(batch)
        sum(v.float().square().mean() for v in out["reconstruction"].values()).backward()
    assert training_flops_per_sample(model) * 2 == pytest.approx(counter.get_total_flops(), rel=5e-3)


def test_hip256_imagenet_training_flops():
    with torch.device("meta"):
        model = build_hip("256", {"image": (224 * 224, 3)}, {"label": (1, 1000)})
    assert 140e9 < training_flops_per_sample(model) < 150e9
