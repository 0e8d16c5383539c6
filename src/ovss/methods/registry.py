"""The method registry: a plain dict from name to :class:`MethodSpec` (segment-anything's builder dict)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ovss.errors import OvssError
from ovss.methods.common import Backbones, MethodOutput, WindowBatch

MethodFn = Callable[[Backbones, WindowBatch, Any], MethodOutput]


@dataclass(frozen=True)
class Geometry:
    """Default test-time geometry of a method for arbitrary images (presets override it per dataset)."""

    short_side: int | None  # resize the short side to this many pixels (None: use the image as given)
    crop: int  # window side c in processing pixels (0: whole image in one pass)
    stride: int  # window stride s in processing pixels


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: what its last block computes and the defaults that come with it."""

    name: str  # registry name, e.g. "clearclip"
    run: MethodFn  # (backbones, windows, options) -> last-block output tokens on the method's grid
    options: Any  # frozen dataclass instance with the method's own options and their defaults
    logit_scale: float  # temperature tau of the name softmax (spec §5.1)
    pad_multiple: int  # windows are zero-padded symmetrically to a multiple of this (1 = no padding)
    geometry: Geometry  # default resize / crop / stride for generic images
    needs_vfm: bool = False  # whether the method needs a vision foundation model (DINO)
    joint_windows: bool = False  # all windows of an image must be processed in one call (GLA)
    description: str = ""  # one line for `ovss methods` and the README table


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to :data:`METHODS` (names are unique)."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; unknown names raise an :class:`OvssError` listing close matches."""
    _ensure_builtin_methods()
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise OvssError(f"unknown method {name!r}.{hint} Available: {', '.join(available_methods())}")
    return METHODS[name]


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _ensure_builtin_methods()
    return sorted(METHODS)


def _ensure_builtin_methods() -> None:
    # Importing the package registers the built-in methods (each module calls `register`).
    import ovss.methods.builtin  # noqa: F401
