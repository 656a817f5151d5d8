"""Serving: the feature store that holds users' sequences and the item table for ranking."""
