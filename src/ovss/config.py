"""Pipeline configuration (spec §2) shared by the API, the CLI and the benchmark harness."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ovss.errors import OvssError


@dataclass(frozen=True)
class PipelineConfig:
    """Every knob of the dense pipeline; each is a keyword of ``ovss.load`` and a CLI flag of the same name."""

    short_side: int | None  # resize so the short side is this many pixels (None: use the image as given)
    crop: int  # window side c in processing pixels (0: the whole image in one pass)
    stride: int  # window stride s in processing pixels
    logit_scale: float  # temperature tau of the softmax over all names
    bg_threshold: float = 0.0  # pixels whose best class probability is below this get class 0 (0: off)
    area_threshold: float | None = None  # SCLIP area filter: drop classes c >= 1 covering <= this share
    pamr_steps: int = 0  # PAMR refinement iterations on the full-resolution logits (0: off)
    pamr_dilations: tuple[int, ...] = (8, 16)  # PAMR neighbourhood dilations
    templates: str = "imagenet80"  # prompt template set: imagenet80, imagenet7 or maskclip5
    max_long_side: int = 2048  # the resize never makes the long side exceed this
    window_batch: int = 16  # windows per backbone forward (memory only; results are identical)

    def __post_init__(self) -> None:
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
        if self.window_batch < 1:
            raise OvssError(f"window_batch must be >= 1, got {self.window_batch}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
