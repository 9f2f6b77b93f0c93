"""Slurm orchestration: sbatch scripts from cluster presets, chains, sweeps, status. Knows nothing of tensors."""


class SlurmError(RuntimeError):
    """A Slurm command failed (sbatch refused a script, the controller is unreachable)."""
