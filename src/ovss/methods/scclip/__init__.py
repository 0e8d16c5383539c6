"""SC-CLIP (spec §4.11): anomaly repair, mid-layer aggregation, the fused second pass."""
