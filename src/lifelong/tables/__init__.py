"""Collision-less embedding tables, shared by every system that learns id embeddings.

A cuckoo-hash index (``cuckoo.py``), admission filters (``filters.py``), the table with expiry,
sparse optimizers, export and persistence (``table.py``), its ``nn.Module`` face
(``embedding.py``: :class:`~lifelong.tables.embedding.CollisionlessEmbedding`) and the
modulo-hashed baseline (``hashed.py``). Monolith's online ranker and TransAct's row features
(``RowFeatureConfig.tables``) both use them.
"""
