"""The papers' mIoU numbers (spec §8) as data, keyed by (method, preset), for ``ovss report``.

Values are mIoU in percent as printed in the papers (CLIP ViT-B/16). Only rows that an ovss method and
preset reproduce are listed; the other rows of the papers' tables are context and live in the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

METRICS = ("mIoU", "mAcc", "aAcc", "BER")  # what a report table can show (here: torch-free for the CLI)
# Column order of the papers' Table 1 (GLA-CLIP, NACLIP) and of ``ovss report``.
COLUMNS: tuple[str, ...] = ("voc21", "pc60", "coco_object", "voc20", "pc59", "coco_stuff", "cityscapes", "ade20k")
COLUMN_TITLES: dict[str, str] = {
    "voc21": "V21",
    "pc60": "PC60",
    "coco_object": "C-Obj",
    "voc20": "V20",
    "pc59": "PC59",
    "coco_stuff": "C-Stf",
    "cityscapes": "City",
    "ade20k": "ADE",
}


@dataclass(frozen=True)
class Reference:
    """One published row."""

    source: str  # where the numbers are printed, e.g. "GLA-CLIP Table 1"
    miou: dict[str, float]  # dataset -> mIoU (%) as printed; datasets the paper does not report are absent
    average: float | None  # the paper's own average over the eight datasets (None: not over all eight)


def _row(source: str, values: tuple[float, ...], average: float | None) -> Reference:
    """A row in :data:`COLUMNS` order (V21 PC60 C-Obj V20 PC59 C-Stf City ADE)."""
    return Reference(source, dict(zip(COLUMNS, values, strict=True)), average)


_GLA = "GLA-CLIP Table 1"
_GLA_OWN = _row(_GLA, (66.3, 36.1, 37.7, 84.2, 39.9, 26.9, 40.8, 20.0), 44.0)
_CLEARCLIP = _row(_GLA, (51.8, 32.6, 33.0, 80.9, 35.9, 23.9, 30.0, 16.7), 38.1)
_PROXYCLIP = _row(_GLA, (61.3, 35.3, 37.5, 80.3, 39.1, 26.5, 38.1, 20.2), 42.3)
_CASS = _row(_GLA, (65.8, 36.7, 37.8, 87.8, 40.2, 26.7, 39.4, 20.4), 44.4)  # = GLA Table 8's CASS row
_CASS_GLA = _row("GLA-CLIP Table 8", (67.2, 36.8, 36.2, 88.5, 39.7, 27.2, 40.6, 21.0), 44.7)

REFERENCES: dict[tuple[str, str], Reference] = {
    # GLA-CLIP Table 1, one block per setting (§8.1).
    ("proxyclip+gla", "clip-dinoiser"): _row(_GLA, (63.4, 35.8, 37.3, 80.4, 39.4, 26.3, 33.5, 19.1), 41.9),
    ("clearclip", "clearclip"): _CLEARCLIP,
    ("clearclip", "clearclip-release"): _CLEARCLIP,  # the release produced ClearCLIP's published numbers
    ("clearclip+gla", "clearclip"): _row(_GLA, (55.6, 33.2, 34.6, 79.7, 36.5, 24.6, 32.7, 17.4), 39.3),
    ("proxyclip", "proxyclip"): _PROXYCLIP,
    ("proxyclip", "proxyclip-release"): _PROXYCLIP,
    ("proxyclip+gla", "proxyclip"): _row(_GLA, (63.2, 35.8, 37.7, 81.5, 39.7, 26.8, 38.5, 20.3), 42.9),
    ("sclip", "sclip"): _row(_GLA, (59.1, 30.4, 30.5, 80.4, 34.2, 22.4, 32.2, 16.1), 38.2),
    ("sclip+gla", "sclip"): _row(_GLA, (59.8, 32.0, 32.8, 80.5, 35.1, 24.2, 35.1, 18.0), 39.8),
    ("naclip", "naclip"): _row(_GLA, (58.9, 32.2, 33.2, 79.7, 35.2, 23.3, 35.5, 17.4), 39.4),
    # CASS (GLA Table 1, CASS setting; Table 8 repeats it) and CASS + GLA (GLA Table 8, App. I), both run with
    # the CASS release's per-dataset hyper-parameters.
    ("cass", "cass"): _CASS,
    ("cass", "cass-release"): _CASS,  # the release produced CASS's published numbers
    ("cass+gla", "cass"): _CASS_GLA,
    ("cass+gla", "cass-release"): _CASS_GLA,
    ("proxyclip+gla", "gla"): _GLA_OWN,
    ("proxyclip+gla", "gla-release"): _GLA_OWN,  # the release (rho 0.55) is what produced Table 1
    # GLA-CLIP Table 7 (§8.1): "Ours + Fusion"; "Ours" is the Table 1 last row above.
    ("proxyclip+gla+mlf", "gla"): _row("GLA-CLIP Table 7", (67.9, 37.0, 38.1, 84.1, 40.9, 27.5, 43.2, 20.3), 44.9),
    # SC-CLIP Fig. 1 (§8.5, radar chart reproduced in the release README); the spec computes the average.
    ("scclip", "scclip"): _row("SC-CLIP Fig. 1", (64.6, 36.8, 37.7, 84.3, 40.1, 26.6, 41.0, 20.1), 43.9),
    # NACLIP Tables 1 and 4 (§8.3), NACLIP's setting.
    ("naclip", "naclip-pamr"): _row("NACLIP Table 1", (64.1, 35.0, 36.2, 83.0, 38.4, 25.7, 38.3, 19.1), 42.5),
    ("vanilla", "naclip"): _row("NACLIP Table 1", (18.6, 7.8, 6.5, 49.1, 11.2, 5.7, 6.7, 3.2), 13.6),
    ("vanilla-reduced", "naclip"): _row("NACLIP Table 4", (37.5, 22.3, 23.2, 81.4, 24.9, 16.7, 20.2, 11.6), 29.7),
    # SCLIP release README (§8.4, secondary target).
    ("sclip", "sclip-release"): _row(
        "SCLIP release README", (59.63, 31.74, 33.52, 81.54, 34.46, 22.77, 32.34, 16.45), None
    ),
    # GLA-CLIP Table 6 (§8.1); its Trident row is Trident's own ViT-B/16 result (Trident README, §8.6).
    ("trident", "trident"): _row(
        "GLA-CLIP Table 6 = Trident README", (67.1, 38.6, 41.1, 84.5, 42.2, 28.3, 42.9, 21.9), 45.8
    ),
    ("trident+gla", "trident"): _row("GLA-CLIP Table 6", (67.4, 38.9, 41.4, 84.8, 42.4, 28.3, 43.6, 21.7), 46.1),
    # GCLIP Table 1 (§8.2): five datasets without background, ClearCLIP setting; its average is over five.
    ("gclip", "clearclip"): Reference(
        "GCLIP Table 1",
        {"voc20": 81.3, "pc59": 36.8, "ade20k": 18.5, "cityscapes": 33.7, "coco_stuff": 24.8},
        None,
    ),
}


# GLA-CLIP Table 4 (§8.1): other VFMs, run in preset `gla` [ovss]; the paper averages its three datasets only.
# The DINOv2 model is ambiguous (§10 #38): the row belongs to ViT-L/14 with registers, the text's reading.
_TABLE4 = "GLA-CLIP Table 4"
def _table4(voc21: float, pc59: float, coco_stuff: float) -> Reference:
    return Reference(_TABLE4, {"voc21": voc21, "pc59": pc59, "coco_stuff": coco_stuff}, None)


VFM_REFERENCES: dict[tuple[str, str, str], Reference] = {
    ("proxyclip", "gla", "dinov2-vitl14-reg"): _table4(59.6, 37.3, 25.3),
    ("proxyclip+gla", "gla", "dinov2-vitl14-reg"): _table4(60.8, 37.8, 25.7),
    ("proxyclip", "gla", "dinov3_vitb16"): _table4(62.8, 38.8, 26.1),
    ("proxyclip+gla", "gla", "dinov3_vitb16"): _table4(63.6, 38.9, 26.3),
}


def reference_for(method: str, preset: str, vfm: str | None = None) -> Reference | None:
    """The published row of a method in a preset, or None when no paper reports it.

    Args:
        vfm: the VFM when it is not the method's default (then only :data:`VFM_REFERENCES` rows apply).
    """
    if vfm is not None:
        return VFM_REFERENCES.get((method, preset, vfm))
    return REFERENCES.get((method, preset))
