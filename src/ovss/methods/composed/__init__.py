"""Composed methods (X+gla, +mlf): what each base contributes to GLA's cross-window operator (``ovss.gla``)."""
