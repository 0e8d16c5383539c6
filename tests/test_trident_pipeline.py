"""Trident end to end with tiny random CLIP, DINO (patch 16) and SAM: ``ovss.load`` -> set_image -> predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovss
from ovss.errors import OvssError
from ovss.methods.trident.refine import sam_decoder
from ovss.methods.trident.sam import aggregate, aggregation_weights, encode_sam, sam_geometry, valid_attention
from ovss.models.dino import build_vfm, convert_vfm_state_dict
from ovss.models.sam import SamConfig, SamEncoderConfig, SamModel
from ovss.pipeline.maps import FullResolutionMaps, LabelRule
from test_dino import dino_state_dict

LABELS = ["background", "cat", ["dog", "puppy"]]


def tiny_sam(seed: int = 0) -> SamModel:
    """A random SAM: 128-pixel input (8 x 8 tokens), 3 blocks with the last one global, 32-d prompts."""
    enc = SamEncoderConfig(
        patch=16, width=32, depth=3, heads=2, grid=8, window=4, global_blocks=(2,), mlp_dim=64, out_chans=32
    )
    cfg = SamConfig(enc, 32, 16, 1, 2, 64, 2, 3, 2, 32)
    model = SamModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, buf in model.named_buffers():
            if "gaussian" in name:
                buf.copy_(torch.randn(buf.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def sam() -> SamModel:
    return tiny_sam()


@pytest.fixture(scope="module")
def dino16():
    return build_vfm(*convert_vfm_state_dict(dino_state_dict(12, patch=16, grid=4)))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(75, 100, 3), dtype=np.uint8)
    img[:, 50:] = img[:, 50:] // 4 + 160  # two halves with different statistics
    return img


def _load(tiny_clip, dino16, sam, bpe_path, method: str = "trident", **kw):
    kw = {"short_side": 112, "crop": 112, "stride": 56, **kw}
    return ovss.load(method, clip=tiny_clip, vfm=dino16, sam=sam, tokenizer=bpe_path, **kw)


def test_only_the_valid_rows_of_the_last_block_are_computed(sam, image):
    """encode_sam's restricted probabilities = the full 64 x 64-token softmax map, then cropped."""
    emb, logits, values, g = encode_sam(sam, image)
    probs = torch.stack([valid_attention(logits[h][None], logits.rows)[0] for h in range(len(logits))])
    assert g.grid == (5, 8) and probs.shape == (2, 40, 40) and values.shape == (2, 40, 16)  # 80 x 112 -> 91 x 128
    enc = sam.image_encoder
    last = enc.block(2)
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module, inputs, output) -> None:
        captured["x"] = inputs[0]

    handle = last.register_forward_hook(keep_input)
    with torch.no_grad():
        embedding = enc(_sam_pixels(sam, image))
        q, k, v = last.attn.qkv(last.norm1(captured["x"]))
        full = last.attn.logits(q, k, (8, 8)).double().softmax(-1)[0]  # (H, 64, 64): every query row
    rows = g.valid_rows
    torch.testing.assert_close(probs.double(), full[:, rows][:, :, rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(values, v[0][:, rows])
    torch.testing.assert_close(emb, embedding)
    handle.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_sam_then_slabbed_weights_equal_the_full_map(sam, image, dtype):
    """The shipped path (encode_sam in the backbone precision, weights outside it) = the full-map reference."""
    from ovss.precision import backbone_precision
    from test_trident import full_map_weights

    with torch.no_grad(), backbone_precision(torch.device("cpu"), dtype):
        _, logits, values, g = encode_sam(sam, image)
        want = full_map_weights(logits.attn, logits.q, logits.k, logits.grid, logits.rows, values, 1.2, True)
    assert logits.q.dtype == dtype and g.tokens == 40
    for slab in (1, 7, 0, 40):  # one row, a ragged last slab (40 = 5 x 7 + 5), the whole map twice
        got = aggregation_weights(logits, values, g.valid_rows, 1.2, True, rows_per_slab=slab)
        assert torch.equal(got, want), slab


def _sam_pixels(sam: SamModel, rgb: np.ndarray) -> torch.Tensor:
    from ovss.methods.trident.sam import sam_input_image
    from ovss.models.sam import ResizeLongestSide, preprocess

    g = sam_geometry(*rgb.shape[:2], 128, 16)
    resized = ResizeLongestSide(128).apply_image(sam_input_image(rgb, g))
    return preprocess(torch.tensor(resized).permute(2, 0, 1)[None].float(), 128)


def test_predict_equals_the_stages_composed_by_hand(tiny_clip, dino16, sam, bpe_path, image):
    seg = _load(tiny_clip, dino16, sam, bpe_path, refine=False)
    got = seg.predict(image, LABELS)
    st = seg._state
    assert st is not None and st.grid == (5, 8)
    # By hand: spliced sub-image outputs -> SAM affinity -> dense head -> scores -> bilinear -> §2.6.
    from ovss.methods.trident.method import splice
    from ovss.pipeline.image import clip_normalize, resize_short_side
    from ovss.pipeline.windows import canvas_size, resize_canvas

    px = clip_normalize(resize_short_side(image, 112), mean=seg.clip.input_norm.pixel_statistics()[0],
                        std=seg.clip.input_norm.pixel_statistics()[1])  # fmt: skip
    canvas = canvas_size(*px.shape[-2:], 112)
    assert canvas == (128, 160)  # 112 x 149: long side 160, 112 * 160 // 149 = 120 -> 128
    px = resize_canvas(px, canvas)
    windows = st.windows
    crops = torch.stack([px[:, w.y1 : w.y2, w.x1 : w.x2] for w in windows])
    from ovss.methods.common import Backbones, WindowBatch
    from ovss.pipeline.windows import Padding

    y = seg.method.run(Backbones(seg.clip.visual, dino16), WindowBatch(crops, windows, Padding(0, 0, 0, 0), canvas),
                       seg.options).tokens  # fmt: skip
    Y = splice(y, windows, (7, 7), canvas)
    _, logits, values, g = encode_sam(sam, image)
    Z = aggregate(aggregation_weights(logits, values, g.valid_rows, 1.2, True), Y, g.grid)
    f = F.normalize(seg.clip.visual.head(Z[None]).float(), dim=-1)[0]
    text = seg.encode_names(["background", "cat", "dog", "puppy"])
    logits = F.interpolate((f @ text.T).T.reshape(4, 5, 8)[None], size=(75, 100), mode="bilinear",
                           align_corners=False)[0]  # fmt: skip
    want = FullResolutionMaps.from_logits(logits, LabelRule((0, 1, 2, 2), 3, 40.0, 0.0)).labels()
    torch.testing.assert_close(got.logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.labels, want)


def test_sam_encoder_runs_once_per_image_and_predict_reuses_it(tiny_clip, dino16, sam, bpe_path, image):
    seg = _load(tiny_clip, dino16, sam, bpe_path)
    calls = []
    handle = sam.image_encoder.register_forward_pre_hook(lambda m, i: calls.append(1))
    fwb = sam.image_encoder.forward_with_block_input
    sam.image_encoder.forward_with_block_input = lambda *a, **k: (calls.append(1), fwb(*a, **k))[1]  # type: ignore
    try:
        seg.set_image(image)
        first = seg.predict(None, LABELS)
        second = seg.predict(None, ["sky", "grass"])
        assert len(calls) == 1  # one encoder pass for the image; predict only scores text and refines
    finally:
        handle.remove()
        del sam.image_encoder.forward_with_block_input
    assert first.labels.shape == (75, 100) and second.labels.max() <= 1
    assert "trident_refine" in first.config["method_info"]


def test_refinement_runs_on_the_real_decoder_and_switches_apply(tiny_clip, dino16, sam, bpe_path, image):
    coarse = _load(tiny_clip, dino16, sam, bpe_path, refine=False).predict(image, LABELS)
    for kw in ({}, {"failed": "coarse"}, {"mask_prompt": "batched"}):
        seg = _load(tiny_clip, dino16, sam, bpe_path, coarse_thresh=0.0, min_area=4, iou_thresh=-1e9, **kw)
        got = seg.predict(image, LABELS)
        counts = seg._state.info["trident_refine"]
        assert counts["regions"] > 0 and counts["kept"] == counts["regions"]
        assert got.labels.shape == coarse.labels.shape
        torch.testing.assert_close(got.logits, coarse.logits)  # refinement changes labels, not the scores
    none_kept = _load(tiny_clip, dino16, sam, bpe_path, coarse_thresh=0.0, min_area=4, iou_thresh=1e9)
    assert torch.equal(none_kept.predict(image, LABELS).labels, coarse.labels)


def test_release_mask_prompt_differs_from_the_batched_layout(sam, image):
    emb, _, _, g = encode_sam(sam, image)
    from ovss.methods.trident.refine import SamImage

    decode = sam_decoder(sam, SamImage(emb, g))
    pts = torch.tensor([[[30.0, 40.0]], [[90.0, 20.0]]])
    lab = torch.ones(2, 1, dtype=torch.long)
    box = torch.tensor([[10.0, 10.0, 60.0, 70.0], [70.0, 5.0, 120.0, 50.0]])
    mask = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        release, _ = decode(pts, lab, box, mask)
        batched, _ = decode(pts, lab, box, mask[None].expand(2, -1, -1, -1))
    assert release.shape == batched.shape == (2, 32, 32)
    assert (release - batched).abs().max() > 1e-4  # LayerNorm2d over the height axis (release quirk)


def test_split_halves_encodes_each_half_and_concatenates(tiny_clip, dino16, sam, bpe_path):
    img = np.random.default_rng(1).integers(0, 256, size=(64, 128, 3), dtype=np.uint8)
    seg = _load(tiny_clip, dino16, sam, bpe_path, split_halves=True, refine=False)
    seg.set_image(img)
    assert seg._state.grid == (8, 16)  # two 8 x 8 halves side by side
    assert seg._state.info["trident_sam"]["sam_passes"] == 2
    # 60 x 100 -> rounded 64 x 112 -> halves 64 x 56 handed to SAM as they are (release): 8 x 7 tokens each
    seg.set_image(img[:60, :100])
    assert seg._state.grid == (8, 14)
    seg = _load(tiny_clip, dino16, sam, bpe_path, split_halves=True)
    pred = seg.predict(img, LABELS)
    assert seg._state.info["trident_sam"]["sam_passes"] == 3 and pred.labels.shape == (64, 128)


def test_trident_gla_runs_end_to_end(tiny_clip, dino16, sam, bpe_path, image):
    base = _load(tiny_clip, dino16, sam, bpe_path, refine=False).predict(image, LABELS)
    gla = _load(tiny_clip, dino16, sam, bpe_path, method="trident+gla", refine=False).predict(image, LABELS)
    assert gla.config["method_info"]["gla"]["windows"] == 4  # 2 x 2 sub-images of the 128 x 160 canvas
    assert (gla.logits - base.logits).abs().max() > 1e-5


def test_missing_sam_bad_crop_and_vfm_fail_when_the_segmenter_is_built(tiny_clip, tiny_dino, dino16, sam, bpe_path):
    from ovss.predictor import Segmenter

    seg = _load(tiny_clip, dino16, sam, bpe_path)
    with pytest.raises(OvssError, match="--sam PATH"):
        Segmenter(seg.clip, seg.method, seg.options, seg.pipeline, vfm=dino16, tokenizer=bpe_path)
    with pytest.raises(OvssError, match="multiple of 16"):
        _load(tiny_clip, dino16, sam, bpe_path, crop=100)
    with pytest.raises(OvssError, match="dino-vitb16"):
        _load(tiny_clip, tiny_dino, sam, bpe_path)  # a patch-8 DINO
    with pytest.raises(OvssError, match="pamr_steps=0"):
        _load(tiny_clip, dino16, sam, bpe_path, pamr_steps=10)
