"""The Hierarchical Perceiver (HiP), its class-label bottleneck form, and Perceiver IO.

A HiP embeds each modality, adds learned position encodings, groups everything into
[B, G0, N, E], runs encoder blocks -> processor (1 group) -> decoder blocks with U-Net
skips, and reads a reconstruction of every input position back out. With label
modalities (the reference's HiPClassBottleneck) labels skip the encoder: they are
embedded at the processor, concatenated to its inputs along the index axis, and read
back out right after it.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Union

import torch
from torch import nn

from hipscale.model.blocks import REGROUP_TYPES, HiPBlock, ReconstructionHead, regroup
from hipscale.model.embedding import ModalityEmbedder, PositionEncoder
from hipscale.model.grouping import ConcatGrouper, ModalityGrouper
from hipscale.model.variants import HiPVariant, PerceiverIOVariant

ModalitySpec = Mapping[str, tuple[int, int]]
"""Modality name -> (index_dim M, channels C) of its [B, M, C] tensor."""


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
    """Per-example sizes of one block at train time (all groups together: G groups)."""

    num_groups: int
    input_index_dim: int
    """M: inputs per group the cross-attention reads (after regrouping, labels included)."""
    input_channels: int
    num_latents: int
    """N: latents per group the block outputs."""
    num_channels: int
    residual_channels: Optional[int]
    num_self_attends: int
    self_attend_widening_factor: int
    cross_attend_widening_factor: int


class HiP(nn.Module):
    """Hierarchical Perceiver; with `labels` the class-label bottleneck model.

    Call it on {name: [B, M, C]} for every input modality and every label modality
    (zeros where a label is the target). Returns {"reconstruction": {name: [B, M, C]}
    for every modality including labels, "latents": the final latents [B, G0, N, D]}.
    Train/eval behaviour (latent subsampling, dropout) follows `model.training`.
    """

    def __init__(self, variant: HiPVariant, inputs: ModalitySpec,
                 labels: Optional[ModalitySpec] = None, *,
                 num_position_encoding_channels: Optional[int] = None,
                 regroup_type: str = "reshape",
                 processor_index_dim_train: Optional[int] = None,
                 processor_index_dim_eval: Optional[int] = None,
                 dropout_prob: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        _check_spec("inputs", inputs)
        labels = dict(labels or {})
        _check_spec("labels", labels, allow_empty=True)
        overlap = sorted(set(inputs) & set(labels))
        if overlap:
            raise ValueError(f"labels: modality names {overlap} are also inputs")
        if regroup_type not in REGROUP_TYPES:
            raise ValueError(f"regroup_type: expected one of {REGROUP_TYPES}, got {regroup_type!r}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob: expected a value in [0, 1), got {dropout_prob}")
        self.variant = variant
        self.input_spec = {k: tuple(v) for k, v in inputs.items()}
        self.label_spec = {k: tuple(v) for k, v in labels.items()}
        self.regroup_type = regroup_type
        self.processor_index = variant.num_blocks // 2
        latents_train, latents_eval = _latent_counts(
            variant, self.processor_index, processor_index_dim_train, processor_index_dim_eval)

        e = variant.num_embedding_channels
        self.grouper = self._make_grouper({k: m for k, (m, _) in inputs.items()}, variant.num_groups[0])
        self.embedder = ModalityEmbedder({k: c for k, (_, c) in inputs.items()}, e)
        self.position_encoder = PositionEncoder(
            {k: m for k, (m, _) in inputs.items()}, e,
            project=num_position_encoding_channels is not None and num_position_encoding_channels != e)

        self.geometry = self._block_geometry(latents_train, latents_eval)
        self.blocks = nn.ModuleList(
            HiPBlock(num_groups=g.num_groups, input_channels=g.input_channels,
                     num_latents_train=latents_train[i], num_latents_eval=latents_eval[i],
                     num_channels=g.num_channels, num_self_attends=g.num_self_attends,
                     num_self_attend_heads=variant.num_self_attend_heads[i],
                     self_attend_widening_factor=g.self_attend_widening_factor,
                     num_cross_attend_heads=variant.num_cross_attend_heads[i],
                     cross_attend_widening_factor=g.cross_attend_widening_factor,
                     residual_channels=g.residual_channels, dropout_prob=dropout_prob,
                     drop_path_rate=drop_path_rate)
            for i, g in enumerate(self.geometry))
        for i, g in enumerate(self.geometry):
            if g.input_channels % variant.num_cross_attend_heads[i]:
                raise ValueError(
                    f"variant key 'num_cross_attend_heads': block {i} has "
                    f"{variant.num_cross_attend_heads[i]} heads, which must divide its input "
                    f"channels {g.input_channels}")
        self.reconstruction_head = ReconstructionHead(variant.num_z_channels[-1], e)

        if self.label_spec:
            width = self.geometry[self.processor_index].input_channels
            self.label_embedder = ModalityEmbedder({k: c for k, (_, c) in self.label_spec.items()}, width)
            self.label_position_encoder = PositionEncoder(
                {k: m for k, (m, _) in self.label_spec.items()}, width)
            self.label_head = ReconstructionHead(variant.num_z_channels[self.processor_index], width)

    @staticmethod
    def _make_grouper(index_dims: Mapping[str, int], num_groups: int):
        return ModalityGrouper(index_dims, num_groups)

    def _block_geometry(self, latents_train: list[int], latents_eval: list[int]) -> tuple[BlockGeometry, ...]:
        """Checks that every regroup divides evenly and returns the train-time sizes."""
        v, p, n = self.variant, self.processor_index, self.variant.num_blocks
        label_positions = sum(m for m, _ in self.label_spec.values())
        geometry = []
        groups, sizes, channels = v.num_groups[0], (self.grouper.group_size,) * 2, v.num_embedding_channels
        for i in range(n):
            if i > 0:
                new_groups = v.num_groups[i]
                for mode, size in zip(("train", "eval"), sizes):
                    if (groups * size) % new_groups:
                        raise ValueError(
                            f"variant key 'num_groups': block {i} regroups {groups} groups x {size} "
                            f"latents ({mode}) into {new_groups} groups, which does not divide evenly")
                sizes = tuple(groups * s // new_groups for s in sizes)
                groups = new_groups
            if i == p:
                sizes = tuple(s + label_positions for s in sizes)
            geometry.append(BlockGeometry(
                num_groups=groups, input_index_dim=sizes[0], input_channels=channels,
                num_latents=latents_train[i], num_channels=v.num_z_channels[i],
                residual_channels=v.num_z_channels[n - 1 - i] if i > p else None,
                num_self_attends=v.num_self_attends_per_block[i],
                self_attend_widening_factor=v.self_attend_widening_factor[i],
                cross_attend_widening_factor=v.cross_attend_widening_factor[i]))
            sizes, channels = (latents_train[i], latents_eval[i]), v.num_z_channels[i]
        return tuple(geometry)

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Validates {name: [B, M, C]} against the model's modalities; returns B.

        Raises:
            ValueError: naming the modality, the expected and the actual value.
        """
        expected = {**self.input_spec, **self.label_spec}
        missing = [k for k in expected if k not in inputs]
        if missing:
            name = missing[0]
            m, c = expected[name]
            raise ValueError(f"inputs: missing modality '{name}' (expected a [B, {m}, {c}] tensor); "
                             f"got modalities {sorted(inputs)}")
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise ValueError(f"inputs: unknown modality '{unknown[0]}'; the model expects {sorted(expected)}")
        batch = None
        for name, (m, c) in expected.items():
            shape = tuple(inputs[name].shape)
            if len(shape) != 3:
                raise ValueError(f"inputs['{name}']: expected a [B, {m}, {c}] tensor, got shape {shape}")
            if shape[1] != m:
                raise ValueError(f"inputs['{name}']: expected length (index dim) {m}, got {shape[1]} "
                                 f"(shape {shape})")
            if shape[2] != c:
                raise ValueError(f"inputs['{name}']: expected {c} channels, got {shape[2]} (shape {shape})")
            if batch is not None and shape[0] != batch:
                raise ValueError(f"inputs['{name}']: batch size {shape[0]} differs from {batch} "
                                 f"of the other modalities")
            batch = shape[0]
        return batch

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, object]:
        batch_size = self.check_inputs(inputs)
        embedded = self.embedder.embed_all(inputs)
        encodings = self.position_encoder.encodings(batch_size)
        z = self.grouper.group({k: embedded[k] + encodings[k] for k in embedded})  # [B, G0, N, E]
        queries = self.grouper.group(encodings)                                    # [B, G0, N, E]

        skips: list[torch.Tensor] = []
        n, p = len(self.blocks), self.processor_index
        label_readout: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if i > 0:
                z = regroup(z, block.num_groups, self.regroup_type)
            if i == p and self.label_spec:
                z = torch.cat([z, self._label_tokens(inputs, batch_size)], dim=2)
            z = block(z, residual=skips[n - 1 - i] if i > p else None)
            if i < p:
                skips.append(z)
            if i == p and self.label_spec:
                label_readout = self._read_labels(z, batch_size)

        reconstruction = self.embedder.unembed_all(
            self.grouper.ungroup(self.reconstruction_head(z, queries)))
        reconstruction.update(label_readout)
        return {"reconstruction": reconstruction, "latents": z}

    def _label_tokens(self, inputs: Mapping[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Embedded and position-encoded labels, [B, 1, sum of label M, C_processor_in]."""
        embedded = self.label_embedder.embed_all(inputs)
        encodings = self.label_position_encoder.encodings(batch_size)
        return torch.cat([embedded[k] + encodings[k] for k in self.label_spec], dim=1).unsqueeze(1)

    def _read_labels(self, z: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        """Reads every label out of the processor output z [B, 1, N, D]: {name: [B, M, C]}."""
        encodings = self.label_position_encoder.encodings(batch_size)
        readout = {k: self.label_head(z, q.unsqueeze(1)).squeeze(1) for k, q in encodings.items()}
        return self.label_embedder.unembed_all(readout)


class PerceiverIO(HiP):
    """Perceiver IO: one block, all modalities concatenated into a single group."""

    def __init__(self, variant: PerceiverIOVariant, inputs: ModalitySpec, *,
                 num_position_encoding_channels: Optional[int] = None,
                 processor_index_dim_train: Optional[int] = None,
                 processor_index_dim_eval: Optional[int] = None,
                 dropout_prob: float = 0.0, drop_path_rate: float = 0.0):
        one_block = HiPVariant(
            num_groups=(1,),
            **{f.name: (getattr(variant, f.name),) for f in dataclasses.fields(variant)
               if f.name != "num_embedding_channels"},
            num_embedding_channels=variant.num_embedding_channels)
        super().__init__(one_block, inputs, None,
                         num_position_encoding_channels=num_position_encoding_channels,
                         processor_index_dim_train=processor_index_dim_train,
                         processor_index_dim_eval=processor_index_dim_eval,
                         dropout_prob=dropout_prob, drop_path_rate=drop_path_rate)

    @staticmethod
    def _make_grouper(index_dims: Mapping[str, int], num_groups: int):
        return ConcatGrouper(index_dims)


_OPTIONS = ("num_position_encoding_channels", "regroup_type", "processor_index_dim_train",
            "processor_index_dim_eval", "dropout_prob", "drop_path_rate")


def build_hip(variant: Union[str, Mapping, HiPVariant, PerceiverIOVariant], inputs: ModalitySpec,
              labels: Optional[ModalitySpec] = None, **options) -> HiP:
    """Builds a HiP, a class-bottleneck HiP (with `labels`) or a Perceiver IO.

    Args:
        variant: "Mini", "16", "256", "16x3", "io_mini", "io_c_50m", "io_c_150m", or a dict
            of variant keys (see hipscale.model.variants).
        inputs: input modality name -> (index_dim, channels).
        labels: label modality name -> (index_dim, channels); makes the class-bottleneck model.
        **options: num_position_encoding_channels, regroup_type ("reshape" or
            "transpose_reshape"), processor_index_dim_train, processor_index_dim_eval,
            dropout_prob, drop_path_rate.

    Raises:
        ValueError: naming the bad key, modality or value.
    """
    from hipscale.model.variants import resolve_variant

    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"build_hip: unknown option(s) {unknown}; expected some of {list(_OPTIONS)}")
    resolved = resolve_variant(variant)
    if isinstance(resolved, PerceiverIOVariant):
        if labels:
            raise ValueError("labels: Perceiver IO variants have no class-label bottleneck; "
                             "pass labels as inputs or use a HiP variant")
        if options.get("regroup_type", "reshape") != "reshape":
            raise ValueError("regroup_type: Perceiver IO has a single group and does not regroup")
        options.pop("regroup_type", None)
        return PerceiverIO(resolved, inputs, **options)
    return HiP(resolved, inputs, labels, **options)


def _latent_counts(variant: HiPVariant, processor: int, train_override: Optional[int],
                   eval_override: Optional[int]) -> tuple[list[int], list[int]]:
    """Latents per group of every block at train and eval time (processor overrides applied)."""
    if train_override is not None and eval_override is not None:
        raise ValueError("processor_index_dim_train and processor_index_dim_eval: only one of the "
                         f"two may be set, got {train_override} and {eval_override}")
    latents_train, latents_eval = list(variant.z_index_dim), list(variant.z_index_dim)
    default = variant.z_index_dim[processor]
    if train_override is not None:
        if not 0 < train_override <= default:
            raise ValueError(f"processor_index_dim_train: expected 1..{default} (a subset of the "
                             f"processor's z_index_dim), got {train_override}")
        latents_train[processor] = train_override
    if eval_override is not None:
        if eval_override < default:
            raise ValueError(f"processor_index_dim_eval: expected at least the processor's "
                             f"z_index_dim {default}, got {eval_override}")
        latents_eval[processor] = eval_override
    return latents_train, latents_eval


def _check_spec(what: str, spec: ModalitySpec, allow_empty: bool = False) -> None:
    if not isinstance(spec, Mapping) or (not spec and not allow_empty):
        raise ValueError(f"{what}: expected a non-empty mapping name -> (index_dim, channels), got {spec!r}")
    for name, value in spec.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{what}: modality name {name!r} must be a Python identifier")
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise ValueError(f"{what}['{name}']: expected (index_dim, channels) positive integers, "
                             f"got {value!r}")
