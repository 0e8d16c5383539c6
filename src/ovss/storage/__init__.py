"""Weights and files on disk: the named-weights registry, downloads, caches, atomic writes."""
