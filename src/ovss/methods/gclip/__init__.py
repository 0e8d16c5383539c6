"""GCLIP (spec §4.6): attention-map fusion and FFN channel suppression."""
