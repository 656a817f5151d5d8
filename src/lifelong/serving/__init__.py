"""Serving infrastructure shared by every ranker: the HTTP app, dynamic batching, Prometheus
metrics and the ranker protocol (:mod:`lifelong.serving.ranking`)."""
