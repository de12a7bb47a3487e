"""Our HiP against the reference JAX release: the Haiku fixture, strict loading, the converter."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from hipscale.model import build_hip
from hipscale.model.convert import haiku_name_map, load_haiku
from model_helpers import FIVE_BLOCKS, FIXTURE, TINY_VARIANT, load_fixture, random_inputs

PARITY_ATOL = 1e-6  # the reference's outputs, max abs (measured 1.2e-7 in float32 on CPU: a few ulps)


def _fixture_params():
    data = load_fixture()
    return {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}, data


def test_fixture_output_matches_reference():
    params, data = _fixture_params()
    model = build_hip(TINY_VARIANT, {"image": (32, 3)}).eval()
    load_haiku(model, params)
    with torch.no_grad():
        out = model({"image": torch.from_numpy(data["input/image"])})
    error = (out["reconstruction"]["image"] - torch.from_numpy(data["output/image"])).abs().max()
    print(f"reference parity: {error.item():.2e} max abs")
    assert error < PARITY_ATOL
    assert out["latents"].shape == (1, 2, 4, 8)


def test_strict_loading_names_the_problem():
    params, _ = _fixture_params()
    model = build_hip(TINY_VARIANT, {"image": (32, 3)})
    extra = dict(params, **{"perceiver/block_9/~/unused:w": np.zeros(1)})
    with pytest.raises(ValueError, match="unused keys.*block_9"):
        load_haiku(model, extra)
    missing = {k: v for k, v in params.items() if "block_1/~/self_attend_id_0/layer_norm_1:scale" not in k}
    with pytest.raises(ValueError, match="block_1/~/self_attend_id_0/layer_norm_1:scale"):
        load_haiku(model, missing)
    bad_shape = dict(params)
    bad_shape["perceiver/position_encoder/pos_emb_mae_image:pos_embs"] = np.zeros((31, 4), np.float32)
    with pytest.raises(ValueError, match=r"shape mismatch.*pos_emb_mae_image.*\(32, 4\).*\(31, 4\)"):
        load_haiku(model, bad_shape)


def _export_haiku(model):
    """Our parameters under reference names (the inverse of load_haiku's map)."""
    ours = dict(model.named_parameters())
    return {h: (ours[n].detach().numpy().T if t else ours[n].detach().numpy()).copy()
            for h, n, t in haiku_name_map(model)}


@pytest.mark.parametrize("labels, projection", [(None, None), ({"label": (1, 10), "tag": (2, 3)}, 7)])
def test_name_map_covers_every_parameter_and_round_trips(labels, projection):
    inputs = {"image": (45, 3), "audio": (29, 1)}
    source = build_hip(FIVE_BLOCKS, inputs, labels, num_position_encoding_channels=projection)
    for p in source.parameters():  # unembeddings start at zero: make every weight matter
        torch.nn.init.normal_(p, std=0.2)
    names = {h for h, _, _ in haiku_name_map(source)}
    assert len(names) == len(list(source.parameters()))
    if labels:  # the reference's naming of the class-bottleneck model
        assert "perceiver/perceiver_block_2/~/hi_p_cross_attention/query_inputs:pos_embs" in names
        assert "perceiver/embedder_2/~embed/embed_tag:w" in names
        assert "perceiver/reconstruction_head_1/hi_p_cross_attention/attention/query_linear:w" in names
        assert "perceiver/position_encoder/position_encoding_linear_1:w" in names
    target = build_hip(FIVE_BLOCKS, inputs, labels, num_position_encoding_channels=projection)
    load_haiku(target, _export_haiku(source))
    batch = random_inputs({**inputs, **(labels or {})}, batch=2)
    source.eval(), target.eval()
    with torch.no_grad():
        a, b = source(batch)["reconstruction"], target(batch)["reconstruction"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_convert_command_writes_a_loadable_state_dict(tmp_path):
    out, variant = tmp_path / "tiny.pt", tmp_path / "tiny.json"
    variant.write_text(json.dumps(TINY_VARIANT))
    command = [sys.executable, "-m", "hipscale.model.convert", str(FIXTURE), str(out),
               "--input", "image=32,3", "--key-prefix", "param/"]
    failed = subprocess.run(command + ["--variant", "Mini"], capture_output=True, text=True)
    assert failed.returncode == 2 and "block_0/~/self_attend_id_1" in failed.stderr  # not the fixture's variant
    assert not out.exists()
    ok = subprocess.run(command + ["--variant", str(variant)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    model = build_hip(TINY_VARIANT, {"image": (32, 3)}).eval()
    model.load_state_dict(torch.load(out))
    data = load_fixture()
    with torch.no_grad():
        recon = model({"image": torch.from_numpy(data["input/image"])})["reconstruction"]["image"]
    assert (recon - torch.from_numpy(data["output/image"])).abs().max() < PARITY_ATOL
