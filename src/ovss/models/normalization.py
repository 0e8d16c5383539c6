"""The RGB input statistics a CLIP model was trained with, carried on the loaded model.

Named weights take them from their registry entry; local files from a config beside the weights (Hugging
Face ``preprocessor_config.json`` ``image_mean`` / ``image_std``, an OpenCLIP config's
``preprocess_cfg.mean/std`` or ``image_mean/std``); otherwise OpenAI's. The pipeline normalises on the
0-255 scale: OpenAI statistics use mmseg's rounded values (122.771, ... / 68.501, ...), which every
reference release uses for OpenAI CLIP, and any other statistics are used exactly, times 255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Triple = tuple[float, float, float]

OPENAI_MEAN: Triple = (0.48145466, 0.4578275, 0.40821073)  # CLIP's RGB normalisation (openai/CLIP clip.py)
OPENAI_STD: Triple = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN: Triple = (0.5, 0.5, 0.5)  # e.g. open_clip's ViT-L-14 laion2b_s32b_b82k
INCEPTION_STD: Triple = (0.5, 0.5, 0.5)
IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)  # DINO / DINOv2
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)
# mmseg's rounded 0-255 OpenAI statistics: what the reference releases feed OpenAI CLIP (spec §2.1).
MMSEG_OPENAI_MEAN: Triple = (122.771, 116.746, 104.094)
MMSEG_OPENAI_STD: Triple = (68.501, 66.632, 70.323)


@dataclass(frozen=True)
class InputNorm:
    """Per-channel RGB statistics of a model's training images, on the 0-1 scale (unrounded)."""

    mean: Triple = OPENAI_MEAN  # subtracted from pixel / 255
    std: Triple = OPENAI_STD  # divides (pixel / 255 - mean)
    source: str = "default (OpenAI CLIP)"  # where they came from: registry, a config file, or the default

    @property
    def is_openai(self) -> bool:
        """True when these are OpenAI CLIP's statistics (to 1e-6 relative)."""
        pairs = zip((*self.mean, *self.std), (*OPENAI_MEAN, *OPENAI_STD), strict=True)
        return all(math.isclose(a, b, rel_tol=1e-6) for a, b in pairs)

    def pixel_statistics(self) -> tuple[Triple, Triple, str]:
        """Mean and std on the 0-255 scale as the pipeline applies them, and which rule gave them.

        Returns:
            ``(mean, std, rule)``: mmseg's rounded OpenAI values with rule ``"mmseg-openai-0-255"`` for
            OpenAI statistics (bit-identical to the reference releases), else ``255 * mean`` / ``255 * std``
            with rule ``"model-x255"``.
        """
        if self.is_openai:
            return MMSEG_OPENAI_MEAN, MMSEG_OPENAI_STD, "mmseg-openai-0-255"
        mean = (255.0 * self.mean[0], 255.0 * self.mean[1], 255.0 * self.mean[2])
        std = (255.0 * self.std[0], 255.0 * self.std[1], 255.0 * self.std[2])
        return mean, std, "model-x255"

    def record(self) -> dict[str, Any]:
        """The resolved-config entry: 0-1 statistics, their source, and the 0-255 values used."""
        mean, std, rule = self.pixel_statistics()
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "source": self.source,
            "pixel_mean": list(mean),
            "pixel_std": list(std),
            "rule": rule,
        }


def _triple(value: object) -> Triple | None:
    """Three positive-std-compatible floats from a JSON list (or a scalar repeated), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int | float) for v in value):
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def input_norm_from_config(config: dict[str, Any], source: str) -> InputNorm | None:
    """Statistics declared by a Hugging Face preprocessor config or an OpenCLIP config, if any.

    Looked for, in order: ``preprocess_cfg.mean/std`` (OpenCLIP hub ``open_clip_config.json``),
    ``vision_cfg.image_mean/std`` and ``model_cfg.vision_cfg.image_mean/std`` (OpenCLIP model configs),
    ``image_mean/std`` (Hugging Face ``preprocessor_config.json``).

    Returns:
        The statistics with ``source`` naming the file, or None when the config declares none.

    Raises:
        ValueError: a declared value is not three numbers, or a std is not positive.
    """
    model_cfg = config.get("model_cfg") if isinstance(config.get("model_cfg"), dict) else {}
    candidates = [
        (config.get("preprocess_cfg"), "mean", "std"),
        (config.get("vision_cfg"), "image_mean", "image_std"),
        (model_cfg.get("vision_cfg") if isinstance(model_cfg, dict) else None, "image_mean", "image_std"),
        (config, "image_mean", "image_std"),
    ]
    for holder, mean_key, std_key in candidates:
        if not isinstance(holder, dict) or (mean_key not in holder and std_key not in holder):
            continue
        mean = _triple(holder.get(mean_key, list(OPENAI_MEAN)))
        std = _triple(holder.get(std_key, list(OPENAI_STD)))
        if mean is None or std is None or min(std) <= 0:
            raise ValueError(
                f"{source}: {mean_key}/{std_key} must be three numbers (std > 0), got "
                f"{holder.get(mean_key)!r} / {holder.get(std_key)!r}"
            )
        return InputNorm(mean, std, source)
    return None
