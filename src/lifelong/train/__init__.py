"""Batch training of the rankers, checkpoints; online training comes with the Monolith issue."""
