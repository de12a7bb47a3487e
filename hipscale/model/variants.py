"""HiP and Perceiver IO variants: the per-block hyper-parameter tables and their validation.

A HiP variant lists one value per block (encoder blocks, the processor in the middle,
then the decoder blocks); a Perceiver IO variant has a single block and scalar values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Union

HIP_VARIANTS: dict[str, dict[str, Any]] = {
    "Mini": {
        "num_groups": (16, 1, 16),
        "num_self_attends_per_block": (2, 1, 1),
        "z_index_dim": (128, 64, 128),
        "num_z_channels": (128, 1024, 128),
        "num_cross_attend_heads": (1, 1, 1),
        "num_self_attend_heads": (4, 32, 4),
        "cross_attend_widening_factor": (1, 1, 1),
        "self_attend_widening_factor": (4, 4, 4),
        "num_embedding_channels": 32,
    },
    "16": {
        "num_groups": (16, 4, 1, 1, 1, 4, 16),
        "num_self_attends_per_block": (2, 2, 18, 2, 1, 1, 1),
        "z_index_dim": (128, 256, 256, 64, 256, 256, 128),
        "num_z_channels": (128, 256, 512, 1024, 512, 256, 128),
        "num_cross_attend_heads": (1,) * 7,
        "num_self_attend_heads": (4, 8, 16, 32, 16, 8, 4),
        "cross_attend_widening_factor": (1,) * 7,
        "self_attend_widening_factor": (4,) * 7,
        "num_embedding_channels": 32,
    },
    "256": {
        "num_groups": (256, 64, 16, 4, 1, 1, 1, 4, 16, 64, 256),
        "num_self_attends_per_block": (1, 1, 2, 2, 18, 2, 1, 1, 1, 1, 1),
        "z_index_dim": (32, 64, 128, 256, 256, 64, 256, 256, 128, 64, 32),
        "num_z_channels": (64, 96, 128, 256, 512, 1024, 256, 128, 64, 32, 16),
        "num_cross_attend_heads": (1,) * 11,
        "num_self_attend_heads": (1, 2, 4, 8, 16, 32, 16, 8, 4, 2, 1),
        "cross_attend_widening_factor": (1,) * 11,
        "self_attend_widening_factor": (4,) * 11,
        "num_embedding_channels": 16,
    },
    "16x3": {
        "num_groups": (16, 1, 16),
        "num_self_attends_per_block": (2, 18, 2),
        "z_index_dim": (128, 256, 128),
        "num_z_channels": (128, 1024, 128),
        "num_cross_attend_heads": (1, 1, 1),
        "num_self_attend_heads": (4, 32, 4),
        "cross_attend_widening_factor": (1, 1, 1),
        "self_attend_widening_factor": (4, 4, 4),
        "num_embedding_channels": 32,
    },
}

PERCEIVER_IO_VARIANTS: dict[str, dict[str, int]] = {
    "io_mini": {
        "num_self_attends_per_block": 2,
        "z_index_dim": 128,
        "num_z_channels": 128,
        "num_cross_attend_heads": 1,
        "num_self_attend_heads": 2,
        "cross_attend_widening_factor": 1,
        "self_attend_widening_factor": 2,
        "num_embedding_channels": 128,
    },
    "io_c_50m": {
        "num_self_attends_per_block": 8,
        "z_index_dim": 1024,
        "num_z_channels": 512,
        "num_cross_attend_heads": 8,
        "num_self_attend_heads": 8,
        "cross_attend_widening_factor": 4,
        "self_attend_widening_factor": 4,
        "num_embedding_channels": 512,
    },
    "io_c_150m": {
        "num_self_attends_per_block": 12,
        "z_index_dim": 1024,
        "num_z_channels": 896,
        "num_cross_attend_heads": 16,
        "num_self_attend_heads": 16,
        "cross_attend_widening_factor": 4,
        "self_attend_widening_factor": 4,
        "num_embedding_channels": 896,
    },
}


@dataclasses.dataclass(frozen=True)
class HiPVariant:
    """Per-block hyper-parameters of a HiP; every tuple has one entry per block."""

    num_groups: tuple[int, ...]
    """Groups per block; the middle block (the processor) must have exactly 1."""
    num_self_attends_per_block: tuple[int, ...]
    """Self-attention layers after each block's cross-attention."""
    z_index_dim: tuple[int, ...]
    """Latents per group produced by each block's cross-attention."""
    num_z_channels: tuple[int, ...]
    """Latent channels of each block."""
    num_cross_attend_heads: tuple[int, ...]
    """Heads of each block's cross-attention (the reference uses 1)."""
    num_self_attend_heads: tuple[int, ...]
    """Heads of each block's self-attention layers."""
    cross_attend_widening_factor: tuple[int, ...]
    """MLP widening after each cross-attention."""
    self_attend_widening_factor: tuple[int, ...]
    """MLP widening inside each self-attention layer."""
    num_embedding_channels: int
    """Channels E every modality is embedded to before block 0."""

    @property
    def num_blocks(self) -> int:
        return len(self.num_groups)

    @property
    def processor_index(self) -> int:
        """Index of the middle block, the processor."""
        return self.num_blocks // 2

    def validate(self) -> None:
        """Raises ValueError naming the key when the variant is not a valid HiP."""
        n = self.num_blocks
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "num_embedding_channels":
                _check_positive(field.name, value)
                continue
            if len(value) != n:
                raise ValueError(
                    f"variant key '{field.name}': expected {n} entries (one per block, as in "
                    f"'num_groups'), got {len(value)}: {value}")
            for v in value:
                _check_positive(field.name, v, allow_zero=field.name == "num_self_attends_per_block")
        if n < 3 or n % 2 == 0:
            raise ValueError(
                f"variant key 'num_groups': a HiP needs an odd number of blocks >= 3 "
                f"(encoder blocks, 1 processor, as many decoder blocks), got {n}")
        if self.num_groups[self.processor_index] != 1:
            raise ValueError(
                f"variant key 'num_groups': the processor (block {self.processor_index} of {n}) "
                f"must have exactly 1 group, got {self.num_groups[self.processor_index]}")
        for i in range(n):
            channels, heads = self.num_z_channels[i], self.num_self_attend_heads[i]
            if channels % heads:
                raise ValueError(
                    f"variant key 'num_self_attend_heads': block {i} has {heads} heads, which must "
                    f"divide its num_z_channels {channels}")
        for i in range(n):
            j = n - 1 - i
            if i > self.processor_index and (
                    self.num_groups[i], self.z_index_dim[i]) != (self.num_groups[j], self.z_index_dim[j]):
                raise ValueError(
                    f"variant keys 'num_groups'/'z_index_dim': decoder block {i} takes a U-Net skip "
                    f"from encoder block {j}, so both need the same groups and latents; got "
                    f"{(self.num_groups[i], self.z_index_dim[i])} vs "
                    f"{(self.num_groups[j], self.z_index_dim[j])}")


@dataclasses.dataclass(frozen=True)
class PerceiverIOVariant:
    """Hyper-parameters of a single-block Perceiver IO."""

    num_self_attends_per_block: int
    """Self-attention layers after the cross-attention."""
    z_index_dim: int
    """Number of latents."""
    num_z_channels: int
    """Latent channels."""
    num_cross_attend_heads: int
    """Heads of the encoder cross-attention."""
    num_self_attend_heads: int
    """Heads of the self-attention layers."""
    cross_attend_widening_factor: int
    """MLP widening after the cross-attention."""
    self_attend_widening_factor: int
    """MLP widening inside each self-attention layer."""
    num_embedding_channels: int
    """Channels E every modality is embedded to."""

    def validate(self) -> None:
        """Raises ValueError naming the key when a value is not usable."""
        for field in dataclasses.fields(self):
            _check_positive(field.name, getattr(self, field.name),
                            allow_zero=field.name == "num_self_attends_per_block")
        if self.num_z_channels % self.num_self_attend_heads:
            raise ValueError(
                f"variant key 'num_self_attend_heads': {self.num_self_attend_heads} heads must "
                f"divide num_z_channels {self.num_z_channels}")


Variant = Union[HiPVariant, PerceiverIOVariant]


def resolve_variant(variant: Union[str, Mapping[str, Any], Variant]) -> Variant:
    """Turns a variant name or dict into a validated variant.

    Args:
        variant: a name ("Mini", "16", "256", "16x3", "io_mini", "io_c_50m", "io_c_150m"),
            a dict with the variant keys (tuples give a HiP, scalars a Perceiver IO), or a
            variant object.

    Returns:
        A validated HiPVariant or PerceiverIOVariant.

    Raises:
        ValueError: unknown name, unknown or missing keys, or invalid values.
    """
    if isinstance(variant, (HiPVariant, PerceiverIOVariant)):
        variant.validate()
        return variant
    if isinstance(variant, str):
        if variant in HIP_VARIANTS:
            return resolve_variant(HIP_VARIANTS[variant])
        if variant in PERCEIVER_IO_VARIANTS:
            return resolve_variant(PERCEIVER_IO_VARIANTS[variant])
        known = sorted(HIP_VARIANTS) + sorted(PERCEIVER_IO_VARIANTS)
        raise ValueError(f"variant: unknown name {variant!r}; expected one of {known} or a dict")
    if not isinstance(variant, Mapping):
        raise ValueError(f"variant: expected a name or a dict, got {type(variant).__name__}")
    is_hip = "num_groups" in variant
    cls = HiPVariant if is_hip else PerceiverIOVariant
    expected = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(variant) - expected)
    if unknown:
        raise ValueError(
            f"variant: unknown key(s) {unknown} for a {cls.__name__}; expected keys {sorted(expected)}")
    missing = sorted(expected - set(variant))
    if missing:
        raise ValueError(f"variant: missing key(s) {missing} for a {cls.__name__}")
    values = {}
    for key, value in variant.items():
        if is_hip and key != "num_embedding_channels":
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ValueError(f"variant key '{key}': expected one value per block, got {value!r}")
            value = tuple(value)
        values[key] = value
    resolved = cls(**values)
    resolved.validate()
    return resolved


def _check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"variant key '{key}': expected an integer >= {low}, got {value!r}")
