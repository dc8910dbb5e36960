"""Job launchers (SLURM via submitit, and local ranks); they depend on pixelflow, never the reverse."""
