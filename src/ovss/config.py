"""Pipeline configuration (spec §2) shared by the API, the CLI and the benchmark harness.

:class:`PipelineConfig` is the one definition of the pipeline settings: each field is a keyword of
``ovss.load`` and a CLI flag of the same name (``--short-side`` / ``--short_side``), typed by its annotation
(``ovss.fields``) and documented by its ``help``. The first four have no default of their own: they come
from the method (:func:`method_defaults`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ovss.errors import OvssError
from ovss.fields import check_fields


def _setting(text: str, *default: Any) -> Any:
    """A pipeline field: its help text (CLI and docs) and, when given, its default."""
    if default:
        return field(default=default[0], metadata={"help": text})
    return field(metadata={"help": text})


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of the dense pipeline; each is a keyword of ``ovss.load`` and a CLI flag of the same name."""

    short_side: int | None = _setting("resize so the short side is this many pixels (none: use the image as given)")
    crop: int = _setting("sliding-window side in processing pixels (0: the whole image in one pass)")
    stride: int = _setting("sliding-window stride in processing pixels")
    logit_scale: float = _setting("temperature tau of the softmax over all names")
    bg_threshold: float = _setting(
        "pixels whose best class probability is below this go to the background class (ovss segment: --background "
        "or a class named background, else unlabelled; ovss eval and predict(): class 0) (0: off)",
        0.0,
    )
    area_threshold: float | None = _setting("SCLIP area filter: drop classes >= 1 covering <= this share", None)
    pamr_steps: int = _setting("PAMR refinement iterations on the full-resolution logits (0: off)", 0)
    pamr_dilations: tuple[int, ...] = _setting("PAMR neighbourhood dilations, e.g. 8,16", (8, 16))
    templates: Literal["imagenet80", "imagenet7", "maskclip5"] = _setting("prompt template set", "imagenet80")
    max_long_side: int = _setting("the resize never makes the long side exceed this many pixels", 2048)
    window_batch: int = _setting(
        "at most this many windows per backbone forward (also capped at 1024 tokens; results are identical)", 16
    )

    def __post_init__(self) -> None:
        check_fields(self)  # types and choices from the annotations
        if self.short_side is not None and self.short_side < 1:
            raise OvssError(f"short_side must be a positive number of pixels or None, got {self.short_side}")
        if self.crop < 0:
            raise OvssError(f"crop must be >= 0 (0 = whole image), got {self.crop}")
        if self.crop > 0 and self.stride < 1:
            raise OvssError(f"stride must be >= 1, got {self.stride}")
        if self.crop > 0 and self.stride > self.crop:
            raise OvssError(
                f"stride {self.stride} exceeds crop {self.crop}: pixels between windows would be lost"
            )
        if not self.logit_scale > 0:
            raise OvssError(f"logit_scale must be > 0, got {self.logit_scale}")
        if not 0.0 <= self.bg_threshold <= 1.0:
            raise OvssError(f"bg_threshold must be a probability in [0, 1], got {self.bg_threshold}")
        if self.area_threshold is not None and not 0.0 <= self.area_threshold <= 1.0:
            raise OvssError(f"area_threshold must be in [0, 1] or None, got {self.area_threshold}")
        if self.pamr_steps < 0:
            raise OvssError(f"pamr_steps must be >= 0, got {self.pamr_steps}")
        if not self.pamr_dilations or min(self.pamr_dilations) < 1:
            raise OvssError(f"pamr_dilations must be one or more dilations >= 1, got {self.pamr_dilations}")
        if self.max_long_side < 1:
            raise OvssError(f"max_long_side must be >= 1, got {self.max_long_side}")
        if self.window_batch < 1:
            raise OvssError(f"window_batch must be >= 1, got {self.window_batch}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PIPELINE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(PipelineConfig))  # keywords of ovss.load


def method_defaults(spec: Any) -> dict[str, Any]:
    """The settings a method brings (``MethodSpec``): its geometry and logit scale."""
    geo = spec.geometry
    return {"short_side": geo.short_side, "crop": geo.crop, "stride": geo.stride, "logit_scale": spec.logit_scale}


def pipeline_config(spec: Any, settings: Mapping[str, Any]) -> PipelineConfig:
    """The pipeline configuration of a method with the caller's settings on top of its defaults.

    Args:
        spec: the method's ``MethodSpec`` (geometry and logit scale).
        settings: any subset of the :class:`PipelineConfig` fields.

    Raises:
        OvssError: unknown name, wrong type or value out of range.
    """
    unknown = sorted(set(settings) - set(PIPELINE_KEYS))
    if unknown:
        raise OvssError(f"unknown pipeline setting {', '.join(unknown)}; settings: {', '.join(PIPELINE_KEYS)}")
    return PipelineConfig(**{**method_defaults(spec), **settings})
