"""Training with DeepSpeed: the loop (``trainer``, ``cli``) and its setup (config, data, model, optimizer,
schedule, distributed, elastic restarts, export) here, the parts it uses (checkpoints, fault handling,
metrics, logging, pictures) in :mod:`hipscale.training.components`."""
