"""The training loop and what it keeps: optimizer, EMA, checkpoints, metrics."""
