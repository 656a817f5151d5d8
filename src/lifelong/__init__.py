"""lifelong: recommendation with lifelong user action sequences.

One data model (items, a unified event timeline, users) shared by three production
systems: the TransAct V2 ranker, the DV365 foundation user embedding and Monolith's
collision-less embeddings with online training.
"""

__version__ = "0.1.0"
