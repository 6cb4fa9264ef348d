"""Helpers shared by the training script: configuration, distributed setup, checkpoints, metrics,
logs."""
