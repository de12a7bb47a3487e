"""Basic layers of HiP: initialisation, linear maps, MLPs, multi-head attention, drop-path.

Shapes use B (batch), G (groups), N/M (index: latents or inputs), C/D (channels).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

# Standard deviation of a unit normal truncated to [-2, 2]; dividing by it makes the
# truncated distribution have the intended standard deviation (as the reference does).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def variance_scaling_(tensor: torch.Tensor, fan_in: int, scale: float = 1.0) -> torch.Tensor:
    """Fills `tensor` in place with the reference's variance-scaling initialisation.

    Truncated normal at two deviations whose standard deviation after truncation is
    sqrt(scale / fan_in); scale 0 gives zeros.

    Args:
        tensor: the parameter to fill.
        fan_in: the fan-in (input features of a linear map, first axis of an embedding).
        scale: variance scale.

    Returns:
        The filled tensor.
    """
    if scale == 0.0:
        return nn.init.zeros_(tensor)
    std = math.sqrt(scale / fan_in) / _TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class Linear(nn.Linear):
    """nn.Linear with fan-in variance scaling for the weight and zero bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_scale: float = 1.0):
        self.init_scale = init_scale
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        variance_scaling_(self.weight, fan_in=self.in_features, scale=self.init_scale)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def learned_array(index_dim: int, channels: int) -> nn.Parameter:
    """A learned [index_dim, channels] array (position embedding or latents), fan-in on axis 0."""
    array = torch.empty(index_dim, channels)
    variance_scaling_(array, fan_in=index_dim)
    return nn.Parameter(array)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2, the activation used everywhere in HiP."""
    return torch.square(F.relu(x))


class MLP(nn.Module):
    """Transformer dense block: Linear(C -> w*C), squared ReLU, Linear(w*C -> C), dropout.

    Maps [..., C] to [..., C].
    """

    def __init__(self, channels: int, widening_factor: int, dropout_prob: float = 0.0):
        super().__init__()
        self.hidden = Linear(channels, widening_factor * channels)
        self.output = Linear(widening_factor * channels, channels)
        self.dropout = nn.Dropout(dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.output(squared_relu(self.hidden(x))))


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query/key/value/output projections.

    Queries [B, G, N, Cq] attend to keys/values [B, G, M, Ckv] within each group; the
    result is projected to [B, G, N, out_channels]. Logits are scaled by 1/sqrt(head
    dim). Runs through `F.scaled_dot_product_attention`, so flash and memory-efficient
    kernels are used on GPU (they keep softmax statistics in float32 under bf16).
    """

    def __init__(self, query_channels: int, kv_channels: int, qk_channels: int,
                 v_channels: int, output_channels: int, num_heads: int):
        super().__init__()
        if qk_channels % num_heads or v_channels % num_heads:
            raise ValueError(
                f"attention: {num_heads} heads must divide the query/key width {qk_channels} "
                f"and the value width {v_channels}")
        self.num_heads = num_heads
        self.q_proj = Linear(query_channels, qk_channels)
        self.k_proj = Linear(kv_channels, qk_channels)
        self.v_proj = Linear(kv_channels, v_channels)
        self.out_proj = Linear(v_channels, output_channels)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, G, N, H*d] -> [B*G, H, N, d] (4-D, as the fused kernels want)."""
        b, g, n, c = x.shape
        return x.reshape(b * g, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        b, g, n, _ = queries.shape
        q = self._split_heads(self.q_proj(queries))
        k = self._split_heads(self.k_proj(keys_values))
        v = self._split_heads(self.v_proj(keys_values))
        attended = F.scaled_dot_product_attention(q, k, v)  # [B*G, H, N, d_v]
        attended = attended.transpose(1, 2).reshape(b, g, n, -1)
        return self.out_proj(attended)


class DropPath(nn.Module):
    """Stochastic depth per example, without rescaling (as the reference's StochasticDepth).

    At train time each example's branch is kept with probability 1 - rate; [B, ...] in and out.
    """

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate: expected a value in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        keep = torch.floor(1.0 - self.rate + torch.rand(shape, dtype=x.dtype, device=x.device))
        return x * keep

