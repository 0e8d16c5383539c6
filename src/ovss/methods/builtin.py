"""The built-in methods: name, run function (imported on first use), options and defaults (spec §4, §5.1).

Torch-free, so that listing methods or parsing options never loads a backbone library. Bases first, then the
composed methods (GLA on a base, each with its adapter in ``ovss.methods.composed.bases.ADAPTERS``).
"""

from __future__ import annotations

from ovss.methods.options import (
    CASSOptions,
    ClearCLIPOptions,
    GCLIPOptions,
    MaskCLIPOptions,
    MLFOptions,
    NACLIPOptions,
    ProxyCLIPOptions,
    SCCLIPGLAOptions,
    SCCLIPOptions,
    SCLIPOptions,
    TridentOptions,
    VanillaOptions,
)
from ovss.methods.registry import Geometry, LazyRun, MethodSpec, register, register_gla

_S336 = Geometry(336, 224, 112)  # resize 336, window 224, stride 112
_S448 = Geometry(448, 448, 224)  # ClearCLIP's setting
_DINO_B8 = ("vfm", "dino-vitb8")  # the VFM of DINO-guided methods (ProxyCLIP, CASS)

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
        run=LazyRun("ovss.methods.gclip.method:run_gclip"),
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
        weights=(_DINO_B8,),
        description="ProxyCLIP: CLIP values attended with normalised DINO self-similarity, on the DINO grid",
    ),
    MethodSpec(
        name="scclip",
        run=LazyRun("ovss.methods.scclip.method:run_scclip"),
        options=SCCLIPOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=_S336,
        description="SC-CLIP: anomaly repair, mid-layer similarity aggregation, fused second pass (release)",
    ),
    MethodSpec(
        name="trident",
        run=LazyRun("ovss.methods.trident.method:run_trident"),
        options=TridentOptions(),
        logit_scale=40.0,
        pad_multiple=16,
        geometry=Geometry(448, 336, 224),
        weights=(("vfm", "dino-vitb16"), ("sam", "sam-vitb")),
        description="Trident: spliced CLIP+DINO sub-images, SAM block-11 affinity, SAM mask refinement",
        joint_windows=True,
        windowing="canvas",
        finish=LazyRun("ovss.methods.trident.method:finish_trident"),
        post=LazyRun("ovss.methods.trident.method:refine_trident"),
        check=LazyRun("ovss.methods.trident.method:check_trident"),
    ),
    MethodSpec(
        name="cass",
        run=LazyRun("ovss.methods.cass.method:run_cass"),
        options=CASSOptions(),
        logit_scale=40.0,
        pad_multiple=1,
        geometry=_S336,
        weights=(_DINO_B8,),
        description="CASS: DINO key graph distilled into NACLIP's per head; object-guided text, global logits",
        score=LazyRun("ovss.methods.cass.text:cass_scores"),
        check=LazyRun("ovss.methods.cass.method:check_cass"),
        reads_image=True,  # the global embedding of the whole processing image (global_embedding="image")
    ),
):
    register(_spec)

# Composed methods: GLA on a base (spec §4.8-4.9), and variants with an option part of their own (§4.11.4-4.11.5).
# The flagship's default setting is GLA-CLIP's own (spec §5.2 `gla`: 336 / 224 / 112).
register_gla("proxyclip", _S336)
register_gla("clearclip")
register_gla("sclip")
register_gla("naclip")
register_gla("gclip")
register_gla("trident")
register_gla("cass", pad_multiple=56)  # DINO tokens as keys, like proxyclip+gla's: windows padded to 56
register_gla(
    "scclip",
    extra=SCCLIPGLAOptions(),  # scclip_gla_kk
    description="GLA on SC-CLIP: three cross-window maps (block-8 features, k, fused k'), two passes",
)
# proxyclip+gla with a second value stream (keywords mlf_*): its base is proxyclip, `--gla` on proxyclip stays
# proxyclip+gla.
register_gla(
    "proxyclip",
    _S336,
    extra=MLFOptions(),
    suffix="+mlf",
    description="proxyclip+gla plus SC-CLIP-style multi-layer fusion: values of the sum of blocks 3-9",
)
