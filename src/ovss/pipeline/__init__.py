"""The shared dense-prediction pipeline: image -> windows -> per-window logits -> merged logits -> labels."""
