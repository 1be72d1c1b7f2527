"""Retrieval and zero-shot evaluation, and the metrics they report."""
