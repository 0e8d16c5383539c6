"""Methods: what CLIP's last block computes per window (and, with GLA, across windows)."""

from ovss.methods.registry import METHODS, Geometry, MethodSpec, available_methods, get_method, register

__all__ = ["METHODS", "Geometry", "MethodSpec", "available_methods", "get_method", "register"]
