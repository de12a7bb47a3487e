"""HiP model code: plain PyTorch, free of DeepSpeed and data code."""
from hipscale.model.hip import HiP, PerceiverIO, build_hip
from hipscale.model.variants import HIP_VARIANTS, PERCEIVER_IO_VARIANTS, HiPVariant, PerceiverIOVariant

__all__ = ["HiP", "PerceiverIO", "build_hip", "HIP_VARIANTS", "PERCEIVER_IO_VARIANTS",
           "HiPVariant", "PerceiverIOVariant"]
