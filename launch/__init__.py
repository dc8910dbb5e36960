"""Job launchers (local torchrun and SLURM via submitit); they depend on pixelflow, never the reverse."""
