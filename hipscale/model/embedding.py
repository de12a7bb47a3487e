"""Per-modality embedding, unembedding and learned position encodings.

All tensors here are ungrouped: [B, M, C] per modality.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from hipscale.model.layers import Linear, learned_array


class ModalityEmbedder(nn.Module):
    """One linear map per modality from its raw channels to E, and one back.

    The unembedding is initialised to zero, as in the reference.
    """

    def __init__(self, channels: Mapping[str, int], embedding_channels: int):
        super().__init__()
        self.embed = nn.ModuleDict({name: Linear(c, embedding_channels) for name, c in channels.items()})
        self.unembed = nn.ModuleDict(
            {name: Linear(embedding_channels, c, init_scale=0.0) for name, c in channels.items()})

    def embed_all(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: [B, M, C_m]} -> {name: [B, M, E]}."""
        return {name: layer(inputs[name]) for name, layer in self.embed.items()}

    def unembed_all(self, embedded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: [B, M, E]} -> {name: [B, M, C_m]}."""
        return {name: layer(embedded[name]) for name, layer in self.unembed.items()}


class PositionEncoder(nn.Module):
    """A learned [M, E] position embedding per modality, added to the embedded inputs.

    With `project=True` each modality's embedding goes through a bias-free E -> E linear
    map first. (The reference's comment calls that map shared, but Haiku names each
    modality's copy uniquely, so its weights are per modality; we follow the weights.)
    """

    def __init__(self, index_dims: Mapping[str, int], embedding_channels: int, project: bool = False):
        super().__init__()
        self.pos_embs = nn.ParameterDict(
            {name: learned_array(m, embedding_channels) for name, m in index_dims.items()})
        self.projections: Optional[nn.ModuleDict] = None
        if project:
            self.projections = nn.ModuleDict(
                {name: Linear(embedding_channels, embedding_channels, bias=False) for name in index_dims})

    def encodings(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The position encodings, {name: [B, M, E]} (also the reconstruction queries)."""
        out = {}
        for name, pos in self.pos_embs.items():
            if self.projections is not None:
                pos = self.projections[name](pos)
            out[name] = pos.unsqueeze(0).expand(batch_size, -1, -1)
        return out
