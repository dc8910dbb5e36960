"""Applying parallelism and speed-ups to a plain model from outside (the torchtitan way)."""

from pixelflow.parallel.parallelize import parallelize

__all__ = ["parallelize"]
