"""Checks that run the real trainer for a few steps here; above the planner, which is arithmetic."""
