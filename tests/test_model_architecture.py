"""Architecture facts: parameter counts, shapes at full scale, modes, init, and bad input."""
import pytest
import torch

from hipscale.model import build_hip
from hipscale.model.grouping import ModalityGrouper
from model_helpers import FIVE_BLOCKS, TINY_VARIANT, random_inputs

IMAGE_224 = {"image": (224 * 224, 3)}


@pytest.mark.parametrize("variant, count", [("Mini", 20_272_611), ("16", 100_787_939), ("256", 96_367_155)])
def test_parameter_counts_equal_the_reference(variant, count):
    with torch.device("meta"):
        model = build_hip(variant, IMAGE_224)
    assert sum(p.numel() for p in model.parameters()) == count


def _dataset_specific(model):
    """Parameters tied to a dataset's modalities (the rest is shared between datasets)."""
    prefixes = ("embedder.", "position_encoder.pos_embs", "label_embedder", "label_position_encoder")
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


@pytest.mark.parametrize("variant, labelled, count", [
    ("16", False, 99_224_996), ("256", False, 95_585_188), ("Mini", False, 18_709_668),
    ("Mini", True, 21_114_788)])
def test_parameter_counts_of_the_reference_test_suite(variant, labelled, count):
    """The reference's own test applies one model to two datasets (ImageNet image+label and
    AudioSet audio+label, position projection on), so modality weights add up and the rest
    is shared; with `labelled` the labels go through the class bottleneck."""
    datasets = [({"imagenet_image": (1024, 3)}, {"imagenet_label": (32, 1)}),
                ({"audioset_audio": (128, 16)}, {"audioset_label": (16, 16)})]
    with torch.device("meta"):
        models = [build_hip(variant, inputs, labels, num_position_encoding_channels=512) if labelled
                  else build_hip(variant, {**inputs, **labels}, num_position_encoding_channels=512)
                  for inputs, labels in datasets]
    total = sum(p.numel() for p in models[0].parameters()) + _dataset_specific(models[1])
    assert total == count


def test_full_scale_shapes_on_meta_device():
    with torch.device("meta"):
        image = build_hip("256", {"image": (2048 * 2048, 3)}, {"label": (1, 1000)})
        out = image({"image": torch.empty(8, 2048 * 2048, 3), "label": torch.empty(8, 1, 1000)})
        assert out["reconstruction"]["image"].shape == (8, 2048 * 2048, 3)
        assert out["reconstruction"]["label"].shape == (8, 1, 1000)
        assert out["latents"].shape == (8, 256, 32, 16)
        av_spec = {"video": (8 * 224 * 224, 3), "audio": (122_880, 1)}
        av = build_hip("256", av_spec, {"labels": (1, 527)})
        batch = {k: torch.empty(8, m, c) for k, (m, c) in {**av_spec, "labels": (1, 527)}.items()}
        out = av(batch)
    assert sum(m for m, _ in av_spec.values()) == 524_288
    assert {k: tuple(v.shape) for k, v in out["reconstruction"].items()} == {
        "video": (8, 401_408, 3), "audio": (8, 122_880, 1), "labels": (8, 1, 527)}
    groups = {layout.name: layout.num_groups for layout in av.grouper.layouts}
    assert groups == {"video": 196, "audio": 60}  # proportional to 401,408 : 122,880


def test_perceiver_io_and_transpose_regroup_run():
    io = build_hip("io_mini", {"image": (30, 3), "audio": (17, 1)})
    out = io(random_inputs({"image": (30, 3), "audio": (17, 1)}, batch=2))
    assert out["reconstruction"]["audio"].shape == (2, 17, 1) and out["latents"].shape == (2, 1, 128, 128)
    hip = build_hip(FIVE_BLOCKS, {"x": (40, 2)}, regroup_type="transpose_reshape")
    assert hip(random_inputs({"x": (40, 2)}, 3))["reconstruction"]["x"].shape == (3, 40, 2)


def test_processor_latent_overrides_change_train_and_eval_sizes():
    spec = {"x": (40, 2)}
    sub = build_hip(TINY_VARIANT, spec, processor_index_dim_train=4)
    captured = []
    sub.blocks[1].register_forward_hook(lambda m, i, o: captured.append(o.shape[2]))
    sub.train()(random_inputs(spec, 2))
    sub.eval()(random_inputs(spec, 2))
    assert captured == [4, 8]
    with pytest.raises(ValueError, match=r"regroups 1 groups x 3 latents \(train\) into 2 groups"):
        build_hip(TINY_VARIANT, spec, processor_index_dim_train=3)
    sup = build_hip(TINY_VARIANT, spec, processor_index_dim_eval=12)
    assert sup.blocks[1].cross_attend.latents.shape == (12, 16)
    with pytest.raises(ValueError, match="only one of the two"):
        build_hip(TINY_VARIANT, spec, processor_index_dim_train=3, processor_index_dim_eval=12)


def test_train_mode_randomness_and_eval_determinism():
    spec = {"x": (40, 2)}
    model = build_hip(FIVE_BLOCKS, spec, dropout_prob=0.3, drop_path_rate=0.3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    batch = random_inputs(spec, 4)
    model.eval()
    with torch.no_grad():
        a, b = model(batch)["latents"], model(batch)["latents"]
        model.train()
        c = model(batch)["latents"]
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_initialisation_follows_the_reference():
    model = build_hip("Mini", IMAGE_224)
    pos = model.position_encoder.pos_embs["image"]                       # fan-in is its first axis
    assert abs(pos.std().item() * (224 * 224) ** 0.5 - 1.0) < 0.05
    assert pos.abs().max().item() <= 2.0 / 0.8796 / (224 * 224) ** 0.5 + 1e-6
    weight = model.blocks[1].self_attends[0].mlp.hidden.weight        # [4096, 1024], fan-in 1024
    assert abs(weight.std().item() * 1024 ** 0.5 - 1.0) < 0.02
    assert not model.embedder.unembed["image"].weight.any()
    assert not model.blocks[0].cross_attend.attention.q_proj.bias.any()


def test_grouping_round_trips_and_never_mixes_modalities():
    sizes = {"a": 37, "b": 5, "c": 101}
    grouper = ModalityGrouper(sizes, num_groups=8)
    values = {name: torch.full((2, m, 1), float(i + 1)) + torch.rand(2, m, 1) * 0.5
              for i, (name, m) in enumerate(sizes.items())}
    grouped = grouper.group(values)
    assert grouped.shape[:2] == (2, 8)
    for g in range(8):
        ids = set(grouped[:, g].floor().unique().tolist()) - {0.0}       # 0 = padding
        assert len(ids) == 1, f"group {g} mixes modalities {ids}"
    assert [layout.num_groups for layout in grouper.layouts] == [2, 1, 5]
    back = grouper.ungroup(grouped)
    for name in sizes:
        assert torch.equal(back[name], values[name])


@pytest.mark.parametrize("batch, message", [
    ({"image": torch.zeros(1, 32, 3)}, r"missing modality 'label' \(expected a \[B, 1, 10\] tensor\)"),
    ({"image": torch.zeros(1, 32, 3), "label": torch.zeros(1, 1, 10), "depth": torch.zeros(1, 2, 1)},
     "unknown modality 'depth'"),
    ({"image": torch.zeros(1, 32, 4), "label": torch.zeros(1, 1, 10)}, r"inputs\['image'\]: expected 3 channels, got 4"),
    ({"image": torch.zeros(1, 30, 3), "label": torch.zeros(1, 1, 10)}, r"inputs\['image'\]: expected length .* 32, got 30"),
])
def test_bad_inputs_raise_value_errors_naming_the_modality(batch, message):
    model = build_hip(TINY_VARIANT, {"image": (32, 3)}, {"label": (1, 10)})
    with pytest.raises(ValueError, match=message):
        model(batch)


@pytest.mark.parametrize("change, message", [
    ({"num_groups": (2, 2, 2)}, r"'num_groups': the processor \(block 1 of 3\) must have exactly 1 group, got 2"),
    ({"num_self_attend_heads": (1, 2)}, r"'num_self_attend_heads': expected 3 entries.*got 2"),
    ({"num_self_attend_heads": (1, 3, 1)}, r"'num_self_attend_heads': block 1 has 3 heads.* 16"),
    ({"num_latent_channels": 3}, r"unknown key\(s\) \['num_latent_channels'\]"),
])
def test_bad_variants_raise_value_errors_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        build_hip({**TINY_VARIANT, **change}, {"image": (32, 3)})


def test_bad_build_arguments():
    with pytest.raises(ValueError, match="unknown name 'HiP-9'"):
        build_hip("HiP-9", IMAGE_224)
    with pytest.raises(ValueError, match=r"inputs\['image'\]: expected \(index_dim, channels\)"):
        build_hip("Mini", {"image": (0, 3)})
    with pytest.raises(ValueError, match="unknown option"):
        build_hip("Mini", IMAGE_224, drop_rate=0.1)
    with pytest.raises(ValueError, match="more than|group\\(s\\) but there are 3 modalities"):
        build_hip(TINY_VARIANT, {"a": (4, 1), "b": (4, 1), "c": (4, 1)})


def test_bf16_autocast_forward_and_backward_track_fp32():
    spec = {"x": (40, 2)}
    model = build_hip(FIVE_BLOCKS, spec)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    batch = random_inputs(spec, 2)
    reference = model(batch)["reconstruction"]["x"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)["reconstruction"]["x"]
    low.float().square().mean().backward()
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
