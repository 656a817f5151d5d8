"""Metrics, experiments, reports and plots."""
