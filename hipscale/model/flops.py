"""Analytic FLOP counts of a HiP (matmuls and attention; 2 FLOPs per multiply-add).

Norms, activations, softmax and elementwise work are left out, as is usual for MFU, and
so is the optional position-encoding projection, which runs once per batch, not per example.
Backward costs twice the forward, so a training step costs 3x the forward.
"""
from __future__ import annotations

from hipscale.model.hip import HiP


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _cross_attention(groups: int, inputs: int, input_channels: int, queries: int,
                     query_channels: int, widening: int) -> int:
    """One cross-attention + MLP over G groups: M inputs of width C, N queries of width D."""
    g, m, c, n, d = groups, inputs, input_channels, queries, query_channels
    flops = _linear(g * n, d, c)                 # query projection to the key width C
    flops += 2 * _linear(g * m, c, c)            # keys and values
    flops += 2 * (2 * g * n * m * c)             # logits and weighted sum
    flops += _linear(g * n, c, d)                # output projection
    flops += 2 * _linear(g * n, d, widening * d)  # MLP
    return flops


def _self_attention(groups: int, tokens: int, channels: int, widening: int) -> int:
    g, n, d = groups, tokens, channels
    flops = 4 * _linear(g * n, d, d)             # q, k, v, output projections
    flops += 2 * (2 * g * n * n * d)             # logits and weighted sum
    flops += 2 * _linear(g * n, d, widening * d)  # MLP
    return flops


def forward_flops_per_sample(model: HiP) -> int:
    """Forward FLOPs of one example at train time (processor train override applied)."""
    e = model.variant.num_embedding_channels
    total = 0
    for m, c in model.input_spec.values():
        total += _linear(m, c, e) + _linear(m, e, c)  # embed and unembed
    for geometry in model.geometry:
        g, d = geometry.num_groups, geometry.num_channels
        total += _cross_attention(g, geometry.input_index_dim, geometry.input_channels,
                                  geometry.num_latents, d, geometry.cross_attend_widening_factor)
        if geometry.residual_channels is not None and geometry.residual_channels != d:
            total += _linear(g * geometry.num_latents, geometry.residual_channels, d)
        total += geometry.num_self_attends * _self_attention(
            g, geometry.num_latents, d, geometry.self_attend_widening_factor)
    last = model.geometry[-1]
    total += _cross_attention(model.grouper.num_groups, last.num_latents, last.num_channels,
                              model.grouper.group_size, e, 1)
    if model.label_spec:
        processor = model.geometry[model.processor_index]
        width = processor.input_channels
        for m, c in model.label_spec.values():
            total += _linear(m, c, width) + _linear(m, width, c)
            total += _cross_attention(1, processor.num_latents, processor.num_channels, m, width, 1)
    return total


def training_flops_per_sample(model: HiP) -> int:
    """Forward + backward FLOPs of one example (3x the forward)."""
    return 3 * forward_flops_per_sample(model)
