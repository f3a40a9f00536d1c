"""Training: the config, the loop, checkpoints, metrics and distributed setup."""
