"""Training-time augmentation on the device, in the raw-input layout ([B, M, C] per modality).

`Augmentation` (pipeline.py) chains the pieces a config switches on: the clip window (window.py), random
resized crops and flips (geometry.py), RandAugment-style colour operations (colour.py), MixUp and CutMix
with label smoothing (mixup.py).
"""
from hipscale.augment.pipeline import AugmentError, Augmentation

__all__ = ["AugmentError", "Augmentation"]
