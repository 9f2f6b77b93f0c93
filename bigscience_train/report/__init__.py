"""The run report: plots, carbon totals and evaluation table of a run directory."""
