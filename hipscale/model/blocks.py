"""HiP building blocks: regrouping, cross-attention, self-attention, a block, the readout head.

Grouped tensors are [B, G, N, C]: batch, groups, index within a group, channels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hipscale.model.layers import MLP, DropPath, Linear, MultiHeadAttention, learned_array

REGROUP_TYPES = ("reshape", "transpose_reshape")


def regroup(z: torch.Tensor, num_groups: int, regroup_type: str) -> torch.Tensor:
    """Regroups [B, G, N, C] into [B, G', G*N/G', C].

    "reshape" merges neighbouring groups; "transpose_reshape" swaps G and N first, so
    every new group mixes all old groups.
    """
    b, g, n, c = z.shape
    if regroup_type == "transpose_reshape":
        z = z.transpose(1, 2)
    elif regroup_type != "reshape":
        raise ValueError(f"regroup_type: expected one of {REGROUP_TYPES}, got {regroup_type!r}")
    return z.reshape(b, num_groups, g * n // num_groups, c)


class CrossAttention(nn.Module):
    """HiP cross-attention: queries attend to the inputs of their own group, then an MLP.

    With learned latents (num_latents given) the queries are a [G*N_eval, D] array, one
    set per group, and every weight is shared by all groups. At train time, when
    num_latents_train < num_latents_eval, each example and group uses a random subset.
    Otherwise the caller passes the queries (the reconstruction head does).

    Shapes: inputs [B, G, M, C] -> [B, G, N, D]. Query/key and value width = C (the
    input channels); the output is projected to D.
    """

    def __init__(self, input_channels: int, query_channels: int, num_heads: int,
                 widening_factor: int, *, num_groups: int = 1,
                 num_latents_train: Optional[int] = None, num_latents_eval: Optional[int] = None,
                 residual_channels: Optional[int] = None, query_residual: bool = True):
        super().__init__()
        self.num_groups = num_groups
        self.num_latents_train = num_latents_train
        self.num_latents_eval = num_latents_eval
        self.query_residual = query_residual
        if num_latents_eval is not None:
            self.latents = learned_array(num_groups * num_latents_eval, query_channels)
        # U-Net skips: a projection when the skipped latents have another width.
        if residual_channels is not None and residual_channels != query_channels:
            self.residual_projection = Linear(residual_channels, query_channels)
        else:
            self.residual_projection = None
        self.query_norm = nn.LayerNorm(query_channels)
        self.input_norm = nn.LayerNorm(input_channels)
        self.attention = MultiHeadAttention(
            query_channels=query_channels, kv_channels=input_channels,
            qk_channels=input_channels, v_channels=input_channels,
            output_channels=query_channels, num_heads=num_heads)
        self.mlp_norm = nn.LayerNorm(query_channels)
        self.mlp = MLP(query_channels, widening_factor)

    def latent_queries(self, batch_size: int) -> torch.Tensor:
        """The learned queries for this mode: [B, G, N_train or N_eval, D]."""
        queries = self.latents.reshape(1, self.num_groups, self.num_latents_eval, -1)
        queries = queries.expand(batch_size, -1, -1, -1)
        if self.training and self.num_latents_train < self.num_latents_eval:
            # A random subset of latents per example and group, without replacement.
            scores = torch.rand(batch_size, self.num_groups, self.num_latents_eval,
                                device=queries.device)
            index = scores.argsort(dim=-1)[..., :self.num_latents_train]
            index = index.unsqueeze(-1).expand(-1, -1, -1, queries.shape[-1])
            queries = torch.gather(queries, 2, index)
        return queries

    def forward(self, inputs: torch.Tensor, queries: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-attends.

        Args:
            inputs: [B, G, M, C] keys and values.
            queries: [B, G, N, D]; None to use the learned latents.
            residual: optional [B, G, N, C_r] U-Net skip added to the queries first.

        Returns:
            [B, G, N, D].
        """
        if queries is None:
            queries = self.latent_queries(inputs.shape[0])
        if residual is not None:
            if self.residual_projection is not None:
                residual = self.residual_projection(residual)
            queries = queries + residual
        attended = self.attention(self.query_norm(queries), self.input_norm(inputs))
        if self.query_residual:
            attended = attended + queries
        return attended + self.mlp(self.mlp_norm(attended))


class SelfAttention(nn.Module):
    """Pre-LayerNorm transformer layer on [B, G, N, C], attention within each group."""

    def __init__(self, channels: int, num_heads: int, widening_factor: int,
                 dropout_prob: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.attention_norm = nn.LayerNorm(channels)
        self.attention = MultiHeadAttention(
            query_channels=channels, kv_channels=channels, qk_channels=channels,
            v_channels=channels, output_channels=channels, num_heads=num_heads)
        self.attention_dropout = nn.Dropout(dropout_prob)
        self.mlp_norm = nn.LayerNorm(channels)
        self.mlp = MLP(channels, widening_factor, dropout_prob)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(z)
        z = z + self.drop_path(self.attention_dropout(self.attention(normed, normed)))
        return z + self.drop_path(self.mlp(self.mlp_norm(z)))


class HiPBlock(nn.Module):
    """One HiP block after regrouping: a cross-attention to latents, then K self-attentions.

    Maps already-regrouped inputs [B, G, M, C_in] to [B, G, N, D]; the decoder blocks
    also take the U-Net skip [B, G, N, C_skip] of their encoder twin.
    """

    def __init__(self, *, num_groups: int, input_channels: int, num_latents_train: int,
                 num_latents_eval: int, num_channels: int, num_self_attends: int,
                 num_self_attend_heads: int, self_attend_widening_factor: int,
                 num_cross_attend_heads: int, cross_attend_widening_factor: int,
                 residual_channels: Optional[int] = None, dropout_prob: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.num_groups = num_groups
        self.cross_attend = CrossAttention(
            input_channels, num_channels, num_cross_attend_heads, cross_attend_widening_factor,
            num_groups=num_groups, num_latents_train=num_latents_train,
            num_latents_eval=num_latents_eval, residual_channels=residual_channels)
        self.self_attends = nn.ModuleList(
            SelfAttention(num_channels, num_self_attend_heads, self_attend_widening_factor,
                          dropout_prob, drop_path_rate)
            for _ in range(num_self_attends))

    def forward(self, inputs: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = self.cross_attend(inputs, residual=residual)
        for layer in self.self_attends:
            z = layer(z)
        return z


class ReconstructionHead(nn.Module):
    """Reads latents [B, G, N, D] out at given queries [B, G, M, E] -> [B, G, M, E].

    A 1-head cross-attention with widening 1 and no query residual, as in the reference.
    """

    def __init__(self, latent_channels: int, query_channels: int):
        super().__init__()
        self.cross_attend = CrossAttention(latent_channels, query_channels, num_heads=1,
                                           widening_factor=1, query_residual=False)

    def forward(self, latents: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return self.cross_attend(latents, queries=queries)
