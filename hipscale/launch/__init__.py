"""Launch supervision: `python -m hipscale.launch.elastic` runs one node of an elastic job (torchrun under it)."""
