"""Evaluation: zero-shot classification, retrieval, linear probes, compositional probes, reports."""
