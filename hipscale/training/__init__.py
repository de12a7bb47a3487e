"""Training with DeepSpeed: engine setup, policies, checkpoints, metrics and the loop."""
