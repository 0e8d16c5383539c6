"""Trident (spec §4.12): sub-image stage, SAM aggregation (finish) and SAM refinement (post)."""
