"""Per-node energy and emissions with codecarbon, and their sum over the nodes and jobs of a run."""
