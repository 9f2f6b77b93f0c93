"""Side-by-side benchmarks (not tests): each measures us and a peer in the same run and reports the ratio."""
