"""Configuration of the GLA cross-window attention operator (spec §4.8, §4.9, §9.2, §10)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ovss.errors import OvssError
from ovss.fields import check_fields

Norm = Literal["none", "fixed", "dynamic", "global_mean"]
Smoothing = Literal["auto", "off", "eq17", "release_proxyclip"]


@dataclass(frozen=True)
class GLAConfig:
    """Hyper-parameters of GLA (paper defaults; ``GLA_RELEASE`` holds the release's values)."""

    kve: bool = True  # key-value extension: attend to the keys of all L windows (False: own window only)
    proxy: bool = True  # proxy anchors (§4.8.2); False: similarity of the initial query itself
    norm: Norm = "dynamic"  # none | fixed | dynamic | global_mean (§4.8.4, ablation §4.8.7)
    rho: float = 0.6  # proxy threshold on cosine similarity, strict (s > rho); release runs 0.55
    steps: int = 2  # T, number of proxy refinement steps (>= 1)
    lam1: float = 0.3  # lambda_1 of the dynamic shift u = 1 + lam1 * ln(1 + L)
    lam2: float = 30.0  # lambda_2 of the sharpening weight w_i = 1 + lam2 / |P_i|
    beta: float = 1.2  # shift of the fixed / global_mean normalisation
    gamma: float = 3.0  # scale of the fixed / global_mean normalisation
    clamp_mean: bool = False  # clamp the per-query mean mu_i at 0 (release behaviour; paper Eq. 13 has none)
    smoothing: Smoothing = "auto"  # auto | off | eq17 | release_proxyclip: initial-query smoothing (§4.8.3)
    chunk_rows: int | None = None  # query rows per chunk; None: one window, less if over memory_budget_mb (§9.2)
    memory_budget_mb: float = 1024.0  # MiB for the O(R*M) row-chunk buffers when chunk_rows is None
    temperature: float = 1.0  # softmax temperature t: alpha = softmax(Attn / t)

    def __post_init__(self) -> None:
        check_fields(self, prefix="gla_")  # types and Literal choices from the annotations
        if not -1.0 <= self.rho <= 1.0:
            raise OvssError(f"gla_rho is a cosine threshold in [-1, 1], got {self.rho}")
        if self.steps < 1:
            raise OvssError(f"gla_steps (T) must be >= 1, got {self.steps}")
        for name in ("lam1", "lam2", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise OvssError(f"gla_{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.gamma) and self.gamma > 0.0):
            raise OvssError(f"gla_gamma must be finite and > 0, got {self.gamma}")
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise OvssError(f"gla_temperature must be finite and > 0, got {self.temperature}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise OvssError(f"gla_chunk_rows must be None or >= 1, got {self.chunk_rows}")
        if not (math.isfinite(self.memory_budget_mb) and self.memory_budget_mb > 0.0):
            raise OvssError(f"gla_memory_budget_mb must be > 0, got {self.memory_budget_mb}")


GLA_RELEASE = GLAConfig(rho=0.55, clamp_mean=True)  # preset `gla-release` (spec §10 rows 1-2)
