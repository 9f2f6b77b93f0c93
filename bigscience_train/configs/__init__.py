"""The Hydra config tree, composed from `pkg://bigscience_train.configs`: Hydra only reads a package's
configs when the package has this file."""
