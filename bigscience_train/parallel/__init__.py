"""Process groups, the device mesh and data-parallel wrapping. Knows nothing of Slurm or of the model's code."""
