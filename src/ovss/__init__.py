"""ovss: training-free open-vocabulary semantic segmentation with frozen CLIP (and DINO).

>>> import ovss
>>> seg = ovss.load("clearclip", clip="ViT-B/16")
>>> result = seg.predict("photo.jpg", ["sky", "road", ["person", "pedestrian"]])
>>> result.labels.shape  # (H0, W0) class index per pixel

The public names are imported on first use, so ``import ovss`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "ovss.api",
    "OvssError": "ovss.errors",
    "available_models": "ovss.storage.hub",
    "available_methods": "ovss.methods",
    "Prediction": "ovss.prediction",
    "Segmenter": "ovss.predictor",
    "Tuning": "ovss.tuning",
    "evaluate": "ovss.eval.runner",
}

__all__ = [
    "OvssError",
    "Prediction",
    "Segmenter",
    "Tuning",
    "__version__",
    "available_methods",
    "available_models",
    "evaluate",
    "load",
]

if TYPE_CHECKING:
    from ovss.api import load
    from ovss.errors import OvssError
    from ovss.eval.runner import evaluate
    from ovss.methods import available_methods
    from ovss.prediction import Prediction
    from ovss.predictor import Segmenter
    from ovss.storage.hub import available_models
    from ovss.tuning import Tuning


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ovss' has no attribute {name!r}")
