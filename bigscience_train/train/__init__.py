"""Training: `python -m bigscience_train.train [overrides]`, under torchrun or srun too."""
