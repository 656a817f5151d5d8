"""Monolith's room: collision-less embedding tables (cuckoo index, admission filters, expiry,
sparse optimizers), event streams, the online joiner and trainer, parameter sync and the online
ranker the service runs."""
