"""From loader batches to model inputs: normalisation on the device and an endless epoch stream."""
from __future__ import annotations

from typing import Any, Iterator

import torch

# Raw integer inputs -> float: uint8 pixels to [-1, 1], int16 audio samples to [-1, 1).
_SCALE = {torch.uint8: (1 / 127.5, -1.0), torch.int16: (1 / 32768.0, 0.0)}


def model_inputs(batch: dict, modalities: list[str], device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Normalised float inputs {name: [B, M, C]} on `device` from raw uint8/int16 batch tensors."""
    out = {}
    for name in modalities:
        x = torch.as_tensor(batch[name]).to(device, non_blocking=True)
        scale, shift = _SCALE.get(x.dtype, (1.0, 0.0))
        out[name] = (x.float() * scale + shift).to(dtype)
    return out


def labels_of(batch: dict, multi_label: bool, device: torch.device) -> torch.Tensor:
    """Targets on `device`: float multi-hot [B, K] (multi_label) or int64 class indices [B]."""
    key = "labels" if multi_label else "label"
    return torch.as_tensor(batch[key]).to(device, non_blocking=True)


class EpochStream:
    """Endless iterator over a loader's epochs that can save and restore its position.

    Args:
        loader: has `set_epoch`, `state_dict`, `load_state_dict` and yields batches.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self.epoch = 0
        self._it: Iterator | None = None

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self.epoch += 1
                self._it = None

    def __iter__(self) -> "EpochStream":
        return self

    def close(self) -> None:
        """End the current pass (its DataLoader worker processes exit now)."""
        if self._it is not None:
            self._it.close()
            self._it = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._it = iter(self.loader)
