"""Monolith: collision-less embedding tables (cuckoo index, admission filters, expiry, sparse
optimizers) and the streaming half of online training (event streams, the online joiner)."""
