"""Speed and memory switches of the pipeline: one frozen dataclass, carried by the Segmenter.

None of these fields selects a method or a setting: each trades speed against memory (or one kernel
against another) on the same computation. The comment of each field says what it trades and whether
the result is bit-identical for every value or equal up to floating-point rounding (summation order,
a product of another shape taking another kernel). ``ovss.load(..., tuning=Tuning(...))`` sets them (or
a mapping of the same keywords); the Segmenter passes them explicitly to the code that uses them and
records them in its ``config`` (hence ``config.json``). Nothing reads a module global at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ovss.errors import OvssError

__all__ = ["DEFAULT_TUNING", "Tuning", "resolve_tuning"]


@dataclass(frozen=True)
class Tuning:
    """Speed / memory switches; the defaults are what every published number was measured with."""

    # Tokens per pass through a ViT's blocks (CLIP, DINO, the text tower); a larger batch runs a few samples
    # at a time, keeping the element-wise passes in cache (less memory, fewer page faults). 0: the whole batch
    # in one pass. Samples are independent: bit-identical in every test (0, 1, 40, default; fp32 and bf16),
    # though a product over fewer rows may in principle take another kernel, so: equal up to rounding.
    block_tokens: int = 1024
    # Token budget of one backbone forward over a batch of windows (of the largest backbone grid);
    # ``window_batch`` stays the upper bound. Smaller batches stay in cache. 0: ``window_batch`` alone.
    # Bit-identical in every test, equal up to rounding in principle (as block_tokens).
    window_tokens: int = 1024
    # SAM encoder: logits per attention pass (one head, a slab of query rows), so the map is softmaxed and
    # multiplied while in cache (less memory, faster). 0: a head's whole map at once. Equal up to rounding:
    # a product over a few rows rounds differently (7e-8 in fp32 at 100 logits a pass).
    attention_chunk: int = 1 << 21
    # SAM encoder: fold the relative position terms into the q.k product where they add <= head_dim columns
    # (the 14 x 14 windows): faster in bf16, and the logit is rounded once instead of three times. False:
    # added to the logits in place. Equal up to rounding (same in fp32 here; bf16 differs by ~1e-2).
    fold_positions: bool = True
    # Trident: query rows per softmax / mask / accumulation slab of SAM's block-11 aggregation; bounds the
    # memory to one head's logits. 0: a head's n_s rows at once. Bit-identical for every value (the products
    # stay head-wide, only row-wise steps are slabbed; torch.equal in tests/test_trident.py).
    aggregation_rows: int = 512
    # bf16 / fp16: keep a copy of each Linear's weights cast once per dtype instead of re-casting them on
    # every call (faster; costs a reduced copy of the backbones' weights). False: plain autocast.
    # Bit-identical (the same .to(dtype) rounding; tests/test_precision.py).
    keep_reduced_copies: bool = True
    # bf16 / fp16: the image backbones ovss.load reads from files (CLIP's image tower, the DINO VFM) store their
    # blocks' matrix-product weights in that dtype instead of fp32 (the values autocast would cast them to), so a
    # reduced segmenter holds one copy of them, not fp32 + reduced: its peak memory is at most fp32's. Models
    # passed in built are never changed. Bit-identical products; an fp32 product outside autocast on those
    # weights (GLA's out-projection, GCLIP's fc2 statistics) uses their reduced values. False: fp32 weights.
    reduced_weights: bool = True
    # GLA: average a proxy set with a sparse product when at most 1 / sparse_below of the (R, M) selection
    # is set (about 3x faster on CPU); 1: always sparse; 0: always the dense product. Equal up to rounding
    # (summation order: 9e-8 in fp32 between 1 and the default).
    sparse_below: int = 8
    # Full-resolution maps: logits per row band of the (Q, H0, W0) map that labels, probabilities and the area
    # filter are computed in (memory of one band: 4 bytes each). 0: the whole image in one band.
    # Bit-identical labels and logits for every value (probabilities to 1e-7; tests/test_predictor.py).
    band_elements: int = 1 << 22

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(value, bool):
                    raise OvssError(f"tuning {f.name} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OvssError(f"tuning {f.name} must be an integer >= 0 (0 turns it off), got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (the ``tuning`` entry of a Segmenter's ``config``)."""
        return dataclasses.asdict(self)


DEFAULT_TUNING = Tuning()


def resolve_tuning(tuning: Tuning | Mapping[str, Any] | None) -> Tuning:
    """A :class:`Tuning` from a Tuning, a mapping of its field names, or None (the defaults).

    Raises:
        OvssError: an unknown field name, a value of the wrong type or below 0, or another kind of object.
    """
    if tuning is None:
        return DEFAULT_TUNING
    if isinstance(tuning, Tuning):
        return tuning
    if not isinstance(tuning, Mapping):
        raise OvssError(f"tuning must be an ovss.Tuning or a dict of its fields, got {type(tuning).__name__}")
    known = {f.name for f in dataclasses.fields(Tuning)}
    unknown = sorted(str(key) for key in tuning if key not in known)
    if unknown:
        raise OvssError(f"unknown tuning field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return Tuning(**tuning)
