"""Key-value stores: the feature store (LMDB, Redis) and the DV365 embedding records."""
