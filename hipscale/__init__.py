"""hipscale: Hierarchical Perceiver (HiP) training on raw inputs at cluster scale."""

__version__ = "0.1.0"
