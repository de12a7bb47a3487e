"""Weight import from the JAX/Haiku release of HiP.

`load_haiku(model, params)` takes a flat mapping "<haiku module path>:<param name>" ->
array, as the reference names them (e.g.
"perceiver/block_0/~/hi_p_cross_attention/attention/query_linear:w"), and fills every
parameter of our model, strictly. The command line converts an .npz of such keys:

    python -m hipscale.model.convert params.npz out.pt --variant 256 \
        --input image=50176,3 [--label label=1,1000] [--key-prefix param/]
"""
from __future__ import annotations

import argparse
import json
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from hipscale.model.blocks import CrossAttention
from hipscale.model.hip import HiP, PerceiverIO, build_hip

_ROOT = "perceiver"


def _linear(prefix: str, target: str, bias: bool = True) -> Iterator[tuple[str, str, bool]]:
    """(haiku key, torch name, transpose) for a haiku Linear ([in, out] weight)."""
    yield f"{prefix}:w", f"{target}.weight", True
    if bias:
        yield f"{prefix}:b", f"{target}.bias", False


def _layer_norm(prefix: str, target: str) -> Iterator[tuple[str, str, bool]]:
    yield f"{prefix}:scale", f"{target}.weight", False
    yield f"{prefix}:offset", f"{target}.bias", False


def _attention(prefix: str, target: str) -> Iterator[tuple[str, str, bool]]:
    for haiku, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                        ("attention_output", "out_proj")):
        yield from _linear(f"{prefix}/attention/{haiku}_linear", f"{target}.attention.{ours}")


def _mlp(prefix: str, target: str) -> Iterator[tuple[str, str, bool]]:
    yield from _linear(f"{prefix}/dense/mlp_hidden_linear", f"{target}.mlp.hidden")
    yield from _linear(f"{prefix}/dense/mlp_output_linear", f"{target}.mlp.output")


def _cross_attention(prefix: str, target: str, module: CrossAttention) -> Iterator[tuple[str, str, bool]]:
    # Haiku creates the layer norms in call order: queries, inputs, then the MLP's.
    if hasattr(module, "latents"):
        yield f"{prefix}/query_inputs:pos_embs", f"{target}.latents", False
    if module.residual_projection is not None:
        yield from _linear(f"{prefix}/pre_attention_residual_linear", f"{target}.residual_projection")
    yield from _attention(prefix, target)
    yield from _layer_norm(f"{prefix}/layer_norm", f"{target}.query_norm")
    yield from _layer_norm(f"{prefix}/layer_norm_1", f"{target}.input_norm")
    yield from _layer_norm(f"{prefix}/layer_norm_2", f"{target}.mlp_norm")
    yield from _mlp(prefix, target)


def _self_attention(prefix: str, target: str) -> Iterator[tuple[str, str, bool]]:
    yield from _attention(prefix, target)
    yield from _layer_norm(f"{prefix}/layer_norm", f"{target}.attention_norm")
    yield from _layer_norm(f"{prefix}/layer_norm_1", f"{target}.mlp_norm")
    yield from _mlp(prefix, target)


def _embedding(embedder: str, encoder: str, names, prefix: str, project: bool):
    for index, name in enumerate(names):
        yield from _linear(f"{embedder}/~embed/embed_{name}", f"{prefix}embedder.embed.{name}")
        yield from _linear(f"{embedder}/~unembed/unembed_{name}", f"{prefix}embedder.unembed.{name}")
        yield f"{encoder}/pos_emb_mae_{name}:pos_embs", f"{prefix}position_encoder.pos_embs.{name}", False
        if project:
            # Haiku numbers the per-modality projections in modality order.
            suffix = f"_{index}" if index else ""
            yield from _linear(f"{encoder}/position_encoding_linear{suffix}",
                               f"{prefix}position_encoder.projections.{name}", bias=False)


def haiku_name_map(model: HiP) -> list[tuple[str, str, bool]]:
    """Lists (haiku key, our parameter name, transpose?) for every parameter of `model`.

    Haiku names: blocks are "block_i" in HiP and Perceiver IO and "perceiver_block_i" in
    the class-bottleneck model, whose label modules are "embedder_k"/"position_encoder_k"
    (k = 1, 2, ... in label order) and whose label readout head, created first, is
    "reconstruction_head" (the main head is then "reconstruction_head_1").
    """
    r = _ROOT
    with_labels = bool(model.label_spec)
    entries = list(_embedding(f"{r}/embedder", f"{r}/position_encoder", model.input_spec, "",
                              model.position_encoder.projections is not None))
    block_name = "perceiver_block" if with_labels else "block"
    for i, block in enumerate(model.blocks):
        prefix = f"{r}/{block_name}_{i}/~"
        entries += _cross_attention(f"{prefix}/hi_p_cross_attention", f"blocks.{i}.cross_attend",
                                    block.cross_attend)
        for j in range(len(block.self_attends)):
            entries += _self_attention(f"{prefix}/self_attend_id_{j}", f"blocks.{i}.self_attends.{j}")
    head = "reconstruction_head_1" if with_labels else "reconstruction_head"
    entries += _cross_attention(f"{r}/{head}/hi_p_cross_attention", "reconstruction_head.cross_attend",
                                model.reconstruction_head.cross_attend)
    if with_labels:
        for k, name in enumerate(model.label_spec, start=1):
            for haiku, ours, transpose in _embedding(f"{r}/embedder_{k}", f"{r}/position_encoder_{k}",
                                                     [name], "label_", project=False):
                entries.append((haiku, ours, transpose))
        entries += _cross_attention(f"{r}/reconstruction_head/hi_p_cross_attention",
                                    "label_head.cross_attend", model.label_head.cross_attend)
    return entries


def load_haiku(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Loads reference (Haiku) parameters into `model`, strictly.

    Args:
        model: a model from `build_hip` whose structure matches the parameters.
        params: "<haiku module path>:<param name>" -> array.

    Raises:
        ValueError: listing unused keys, parameters left unfilled, or shape mismatches.
    """
    if not isinstance(model, (HiP, PerceiverIO)):
        raise ValueError(f"load_haiku: expected a model from build_hip, got {type(model).__name__}")
    ours = dict(model.named_parameters())
    mapping = haiku_name_map(model)
    problems = []
    missing_keys = [h for h, _, _ in mapping if h not in params]
    if missing_keys:
        problems.append(f"parameters with no value in params (haiku keys): {missing_keys}")
    mapped = {h for h, _, _ in mapping}
    unused = sorted(k for k in params if k not in mapped)
    if unused:
        problems.append(f"unused keys in params: {unused}")
    unfilled = sorted(set(ours) - {name for _, name, _ in mapping})
    if unfilled:
        problems.append(f"model parameters not covered by the name map: {unfilled}")
    values = {}
    for haiku, name, transpose in mapping:
        if haiku not in params:
            continue
        array = np.asarray(params[haiku])
        array = array.T if transpose else array
        expected = tuple(ours[name].shape)
        if array.shape != expected:
            problems.append(f"shape mismatch for {haiku} -> {name}: expected {expected} "
                            f"(after transpose: {transpose}), got {tuple(array.shape)}")
        values[name] = array
    if problems:
        raise ValueError("load_haiku: " + "; ".join(problems))
    with torch.no_grad():
        for name, array in values.items():
            ours[name].copy_(torch.from_numpy(np.ascontiguousarray(array)).to(ours[name].dtype))


def _modality(text: str) -> tuple[str, tuple[int, int]]:
    try:
        name, sizes = text.split("=")
        index_dim, channels = (int(v) for v in sizes.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=INDEX_DIM,CHANNELS, got {text!r}") from None
    return name, (index_dim, channels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert reference Haiku HiP weights (.npz) to a "
                                                 "PyTorch state dict.")
    parser.add_argument("params", help=".npz with keys '<haiku path>:<name>' (optionally prefixed)")
    parser.add_argument("output", help="where to write the state dict (.pt)")
    parser.add_argument("--variant", required=True,
                        help="variant name (Mini, 16, 256, 16x3, io_mini, ...) or a .json file "
                             "holding a variant dict")
    parser.add_argument("--input", type=_modality, action="append", required=True,
                        help="input modality NAME=INDEX_DIM,CHANNELS (repeat, in model order)")
    parser.add_argument("--label", type=_modality, action="append", default=[],
                        help="label modality NAME=INDEX_DIM,CHANNELS (class-bottleneck model)")
    parser.add_argument("--key-prefix", default="",
                        help="prefix to strip from the keys (e.g. 'param/'); others are ignored")
    parser.add_argument("--num-position-encoding-channels", type=int, default=None)
    args = parser.parse_args(argv)

    with np.load(args.params) as archive:
        params = {k[len(args.key_prefix):]: archive[k] for k in archive.files
                  if k.startswith(args.key_prefix)}
    variant = args.variant
    if variant.endswith(".json"):
        with open(variant) as file:
            variant = json.load(file)
    model = build_hip(variant, dict(args.input), dict(args.label) or None,
                      num_position_encoding_channels=args.num_position_encoding_channels)
    try:
        load_haiku(model, params)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    torch.save(model.state_dict(), args.output)
    print(f"wrote {len(model.state_dict())} tensors "
          f"({sum(p.numel() for p in model.parameters()):,} parameters) to {args.output}")


if __name__ == "__main__":
    main()
