"""The built-in methods: name, run function (imported on first use), options and defaults (spec §4, §5.1).

Torch-free, so that listing methods or parsing options never loads a backbone library. Bases first, then
GLA attached to every base that ``ovss.gla.bases.ADAPTERS`` supports.
"""

from __future__ import annotations

from ovss.methods.options import (
    CASSOptions,
    ClearCLIPOptions,
    GCLIPOptions,
    MaskCLIPOptions,
    NACLIPOptions,
    ProxyCLIPOptions,
    SCLIPOptions,
    VanillaOptions,
)
from ovss.methods.registry import Geometry, LazyRun, LazyScore, MethodSpec, register, register_gla

GLA_BASES = ("proxyclip", "clearclip", "sclip", "naclip", "gclip", "cass")  # the keys of ovss.gla.bases.ADAPTERS

_S336 = Geometry(336, 224, 112)  # resize 336, window 224, stride 112
_S448 = Geometry(448, 448, 224)  # ClearCLIP's setting

for _spec in (
    MethodSpec(
        name="vanilla",
        run=LazyRun("ovss.methods.vanilla:run_vanilla"),
        options=VanillaOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=_S336,
        description="unmodified CLIP last block (q-k attention, residual, FFN)",
    ),
    MethodSpec(
        name="vanilla-reduced",
        run=LazyRun("ovss.methods.vanilla:run_vanilla"),
        options=VanillaOptions(reduced=True),
        logit_scale=40.0,
        pad_multiple=16,
        geometry=_S336,
        description="q-k attention without residual and FFN (the ClearCLIP/GLA releases' 'vanilla')",
    ),
    MethodSpec(
        name="maskclip",
        run=LazyRun("ovss.methods.maskclip:run_maskclip"),
        options=MaskCLIPOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=_S336,
        description="MaskCLIP: value path of the last block, residual and FFN kept",
    ),
    MethodSpec(
        name="maskclip-reimpl",
        run=LazyRun("ovss.methods.maskclip:run_maskclip"),
        options=MaskCLIPOptions(residual_ffn=False),
        logit_scale=40.0,
        pad_multiple=16,
        geometry=_S336,
        description="MaskCLIP as re-implemented by ClearCLIP/GLA: OutProj(v), no residual, no FFN",
    ),
    MethodSpec(
        name="sclip",
        run=LazyRun("ovss.methods.sclip:run_sclip"),
        options=SCLIPOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=_S336,
        description="SCLIP: q-q + k-k correlative attention, residual and FFN kept (release)",
    ),
    MethodSpec(
        name="clearclip",
        run=LazyRun("ovss.methods.clearclip:run_clearclip"),
        options=ClearCLIPOptions(),
        logit_scale=50.0,
        pad_multiple=16,
        geometry=_S448,
        description="ClearCLIP: q-q attention in the last block, no residual, no FFN",
    ),
    MethodSpec(
        name="naclip",
        run=LazyRun("ovss.methods.naclip:run_naclip"),
        options=NACLIPOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=_S336,
        description="NACLIP: k-k attention + Gaussian neighbourhood prior, no residual, no FFN",
    ),
    MethodSpec(
        name="gclip",
        run=LazyRun("ovss.methods.gclip:run_gclip"),
        options=GCLIPOptions(),
        logit_scale=50.0,
        pad_multiple=16,
        geometry=_S448,
        description="GCLIP: ClearCLIP + fusion of global-token block attention + FFN channel suppression",
    ),
    MethodSpec(
        name="proxyclip",
        run=LazyRun("ovss.methods.proxyclip:run_proxyclip"),
        options=ProxyCLIPOptions(),
        logit_scale=40.0,
        pad_multiple=56,
        geometry=Geometry(336, 336, 112),
        needs_vfm=True,
        description="ProxyCLIP: CLIP values attended with normalised DINO self-similarity, on the DINO grid",
    ),
    MethodSpec(
        name="cass",
        run=LazyRun("ovss.methods.cass:run_cass"),
        options=CASSOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=_S336,
        needs_vfm=True,
        description="CASS: DINO key graph distilled into NACLIP's per head; object-guided text, global logits",
        score=LazyScore("ovss.methods.cass_text:cass_scores"),
    ),
):
    register(_spec)

for _base in GLA_BASES:
    # The flagship's default setting is GLA-CLIP's own (spec §5.2 `gla`: 336 / 224 / 112).
    # cass+gla's default keys are DINO tokens, like proxyclip+gla's: windows padded to a multiple of 56.
    register_gla(_base, _S336 if _base == "proxyclip" else None, 56 if _base == "cass" else None)
