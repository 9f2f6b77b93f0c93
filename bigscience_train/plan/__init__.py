"""Scale planner: memory per device and time per iteration of a config on a cluster, before it is queued."""
