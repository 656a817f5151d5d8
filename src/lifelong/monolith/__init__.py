"""Monolith: collision-less embedding tables (cuckoo index, admission filters, expiry, sparse optimizers)."""
