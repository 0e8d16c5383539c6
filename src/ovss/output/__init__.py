"""What a prediction writes: label maps, overlays with legends, logits, masks."""
