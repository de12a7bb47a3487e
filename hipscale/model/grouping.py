"""Grouping of several modalities into [B, G, N, C] and back.

The block-0 group count is split between modalities in proportion to their sizes; a
group never mixes modalities. Each modality is zero-padded at its end to a multiple of
its group count, and every group is zero-padded at its end to the common length N.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


def assign_groups_to_modalities(num_groups: int,
                                index_dims: Sequence[int]) -> tuple[list[int], int]:
    """Splits `num_groups` between modalities of sizes `index_dims`.

    Each modality starts with one group; every further group goes to the modality with
    the most positions per group (the first one on ties), which keeps the largest group
    as small as possible.

    Returns:
        (groups per modality, positions per group N = ceil of the largest M_m / G_m).

    Raises:
        ValueError: more modalities than groups.
    """
    if len(index_dims) > num_groups:
        raise ValueError(
            f"num_groups: block 0 has {num_groups} group(s) but there are {len(index_dims)} "
            f"modalities; a group cannot mix modalities")
    groups = [1] * len(index_dims)
    per_group = [float(m) for m in index_dims]
    for _ in range(num_groups - len(index_dims)):
        fullest = max(range(len(per_group)), key=lambda i: (per_group[i], -i))
        groups[fullest] += 1
        per_group[fullest] = index_dims[fullest] / groups[fullest]
    return groups, math.ceil(max(per_group))


@dataclasses.dataclass(frozen=True)
class ModalityLayout:
    """Where one modality lives in the grouped tensor."""

    name: str
    index_dim: int
    """M, the modality's positions."""
    first_group: int
    num_groups: int
    final_padding: int
    """Zeros appended to the modality so that its groups have equal length."""
    group_padding: int
    """Zeros appended to each of its groups to reach the common group length."""

    @property
    def positions_per_group(self) -> int:
        """Real (modality) positions in each of its groups, final padding included."""
        return (self.index_dim + self.final_padding) // self.num_groups


class ModalityGrouper:
    """Groups a dict of [B, M_m, C] into [B, G, N, C] with the reference's padding rules."""

    def __init__(self, index_dims: Mapping[str, int], num_groups: int):
        groups, self.group_size = assign_groups_to_modalities(num_groups, list(index_dims.values()))
        self.num_groups = num_groups
        layouts, first = [], 0
        for (name, m), g in zip(index_dims.items(), groups):
            final_padding = g * math.ceil(m / g) - m
            local = (m + final_padding) // g
            layouts.append(ModalityLayout(name, m, first, g, final_padding, self.group_size - local))
            first += g
        self.layouts: tuple[ModalityLayout, ...] = tuple(layouts)

    def group(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: [B, M, C]} -> [B, G, N, C], zero padded."""
        grouped = []
        for layout in self.layouts:
            x = F.pad(values[layout.name], (0, 0, 0, layout.final_padding))
            x = x.reshape(x.shape[0], layout.num_groups, layout.positions_per_group, x.shape[-1])
            grouped.append(F.pad(x, (0, 0, 0, layout.group_padding)))
        return torch.cat(grouped, dim=1)

    def ungroup(self, grouped: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, G, N, C] -> {name: [B, M, C]}, padding removed."""
        out = {}
        for layout in self.layouts:
            x = grouped[:, layout.first_group:layout.first_group + layout.num_groups,
                        :layout.positions_per_group]
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            out[layout.name] = x[:, :layout.index_dim]
        return out


class ConcatGrouper:
    """Concatenates all modalities into one group: {name: [B, M_m, C]} -> [B, 1, sum M_m, C].

    Used by Perceiver IO, which has a single group and no padding.
    """

    def __init__(self, index_dims: Mapping[str, int]):
        self.index_dims = dict(index_dims)
        self.num_groups = 1
        self.group_size = sum(self.index_dims.values())
        self.layouts = tuple(ModalityLayout(name, m, 0, 1, 0, 0) for name, m in self.index_dims.items())

    def group(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([values[name] for name in self.index_dims], dim=1).unsqueeze(1)

    def ungroup(self, grouped: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(grouped[:, 0], list(self.index_dims.values()), dim=1)
        return dict(zip(self.index_dims, parts))
