"""Metric learners: the support set is embedded, queries are scored against it."""
