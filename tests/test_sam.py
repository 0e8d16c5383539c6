"""SAM inside ovss against an independent implementation: Hugging Face transformers' ``SamModel``.

A tiny random transformers SAM (image 128 px, patch 16 -> 8 x 8 grid, window 3 so the windowed blocks pad
the grid to 9 x 9 as ViT-B pads 64 to 70, global blocks 1 and 3) is saved as a Hugging Face folder and,
through an inverse name mapping written here, as an official ``sam_vit_*.pth`` state dict; both load with
``load_sam`` and must reproduce transformers' image embeddings, masks and IoU predictions to 1e-5.

transformers builds the two-way transformer's LayerNorms with ``mask_decoder_config.layer_norm_eps``
(default 1e-6); the official code uses ``nn.LayerNorm``'s default 1e-5, which ovss follows, so the tiny
config sets 1e-5.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers  # the independent reference (pyproject [test] extra); the library never imports it
from torch import Tensor

from ovss.errors import OvssError
from ovss.models.sam import SamModel, load_sam
from ovss.models.sam.transforms import ResizeLongestSide, get_preprocess_shape, postprocess_masks, preprocess

TOL = 1e-5
SIZE, GRID = 128, 8  # tiny SAM input and grid; low-resolution masks are 4 * GRID = 32 square


def _tiny_hf_sam() -> torch.nn.Module:
    """A random transformers SamModel with every parameter drawn (position tables and rel-pos included)."""
    config = transformers.SamConfig(
        vision_config={
            "hidden_size": 32,
            "output_channels": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "image_size": SIZE,
            "patch_size": 16,
            "window_size": 3,
            "global_attn_indexes": [1, 3],
            "num_pos_feats": 16,
            "mlp_dim": 64,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": SIZE, "patch_size": 16, "mask_input_channels": 8},
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,  # as every released SAM (an official .pth cannot tell)
            "iou_head_hidden_dim": 24,
            "layer_norm_eps": 1e-5,  # the official two-way transformer uses nn.LayerNorm's default
        },
        attn_implementation="eager",
    )
    model = transformers.SamModel(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # embeddings, position tables, relative positions
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.ConvTranspose2d):  # ~unit-variance outputs
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, torch.nn.LayerNorm):  # near identity, as after training
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return model


# Official segment-anything names from transformers' names, written independently of ovss's loader table.
_TO_OFFICIAL = [
    ("vision_encoder.patch_embed.projection.", "image_encoder.patch_embed.proj."),
    ("vision_encoder.pos_embed", "image_encoder.pos_embed"),
    ("vision_encoder.layers.", "image_encoder.blocks."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".layer_norm3.", ".norm3."),
    (".layer_norm4.", ".norm4."),
    ("vision_encoder.neck.conv1.", "image_encoder.neck.0."),
    ("vision_encoder.neck.norm1.", "image_encoder.neck.1."),
    ("vision_encoder.neck.conv2.", "image_encoder.neck.2."),
    ("vision_encoder.neck.norm2.", "image_encoder.neck.3."),
    ("shared_image_embedding.positional_embedding", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    ("prompt_encoder.point_embed.", "prompt_encoder.point_embeddings."),
    ("prompt_encoder.mask_embed.conv1.", "prompt_encoder.mask_downscaling.0."),
    ("prompt_encoder.mask_embed.norm1.", "prompt_encoder.mask_downscaling.1."),
    ("prompt_encoder.mask_embed.conv2.", "prompt_encoder.mask_downscaling.3."),
    ("prompt_encoder.mask_embed.norm2.", "prompt_encoder.mask_downscaling.4."),
    ("prompt_encoder.mask_embed.conv3.", "prompt_encoder.mask_downscaling.6."),
    ("transformer.layer_norm_final_attn.", "transformer.norm_final_attn."),
    ("mask_decoder.upscale_conv1.", "mask_decoder.output_upscaling.0."),
    ("mask_decoder.upscale_layer_norm.", "mask_decoder.output_upscaling.1."),
    ("mask_decoder.upscale_conv2.", "mask_decoder.output_upscaling.3."),
    (".proj_in.", ".layers.0."),
    (".proj_out.", ".layers.2."),  # both MLP heads of the tiny model have 3 layers
]


def official_state_dict(hf: torch.nn.Module) -> dict[str, Tensor]:
    """The transformers weights under segment-anything's names (what ``sam_vit_b_01ec64.pth`` holds)."""
    out: dict[str, Tensor] = {}
    for key, value in hf.state_dict().items():
        if key == "prompt_encoder.shared_embedding.positional_embedding":
            continue  # tied to shared_image_embedding.positional_embedding
        # hidden MLP layer j of transformers' FFN is official layer j + 1 (proj_in is layer 0)
        key = re.sub(r"(mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.", lambda m: f"{m[1]}.@{int(m[2]) + 1}.", key)
        for old, new in _TO_OFFICIAL:
            key = key.replace(old, new)
        out[key.replace(".@", ".layers.")] = value.clone()
    return out


@pytest.fixture(scope="module")
def hf_sam() -> torch.nn.Module:
    return _tiny_hf_sam()


@pytest.fixture(scope="module")
def checkpoints(hf_sam: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same weights as a Hugging Face folder and as an official-layout .pth."""
    root = tmp_path_factory.mktemp("sam")
    hf_sam.save_pretrained(root / "hf")
    torch.save(official_state_dict(hf_sam), root / "sam_tiny.pth")
    return {"hf": root / "hf", "official": root / "sam_tiny.pth"}


@pytest.fixture(scope="module", params=["hf", "official"])
def sam(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> SamModel:
    return load_sam(str(checkpoints[request.param]))


def _pixels(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_architecture_is_read_off_the_weights(sam: SamModel) -> None:
    enc = sam.cfg.encoder
    assert (enc.patch, enc.width, enc.depth, enc.heads, enc.grid) == (16, 32, 4, 2, GRID)
    assert (enc.window, enc.global_blocks, enc.mlp_dim, enc.out_chans) == (3, (1, 3), 64, 32)
    assert (sam.cfg.prompt_dim, sam.cfg.mask_in_chans, sam.cfg.decoder_depth, sam.cfg.decoder_mlp_dim) == (32, 8, 2, 48)
    assert (sam.cfg.iou_head_depth, sam.cfg.iou_head_hidden_dim, sam.cfg.num_multimask_outputs) == (3, 24, 3)
    assert sam.cfg.downsample_rate == 2 and sam.cfg.decoder_heads == 8 and sam.img_size == SIZE


def test_image_embeddings_match_transformers(sam: SamModel, hf_sam: torch.nn.Module) -> None:
    pixels = _pixels()
    with torch.no_grad():
        expected = hf_sam.get_image_embeddings(pixels)  # (2, 32, 8, 8)
        actual = sam.image_encoder(pixels)
    assert actual.shape == (2, 32, GRID, GRID)
    assert expected.abs().max() > 0.5  # not a degenerate comparison
    assert (actual - expected).abs().max() <= TOL


def test_block_input_is_the_input_of_that_block(sam: SamModel, hf_sam: torch.nn.Module) -> None:
    """forward_with_block_input returns transformers' input of layer 3 (a global block) and the same embedding."""
    pixels = _pixels()
    seen: list[Tensor] = []
    hook = hf_sam.vision_encoder.layers[3].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            hf_sam.get_image_embeddings(pixels)
            embedding, x_in = sam.image_encoder.forward_with_block_input(pixels, 3)
            plain = sam.image_encoder(pixels)
    finally:
        hook.remove()
    assert x_in.shape == (2, GRID, GRID, 32)
    assert (x_in - seen[0]).abs().max() <= TOL
    assert torch.equal(embedding, plain)


@pytest.mark.parametrize("block", [1, 2])  # global (8 x 8) and windowed (3 x 3 windows) attention
def test_logits_of_a_row_subset_equal_slicing_the_full_map(sam: SamModel, block: int) -> None:
    attn = sam.image_encoder.block(block).attn
    side = attn.size
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, side, side, 32, generator=gen)
    q, k, _ = attn.qkv(x)  # (2, 2, side^2, 16) each
    full = attn.logits(q, k, (side, side))  # (2, 2, N, N)
    rows = torch.randperm(side * side, generator=gen)[: side + 2]
    subset = attn.logits(q, k, (side, side), rows=rows)
    assert subset.shape == (2, 2, len(rows), side * side)
    assert (subset - full[:, :, rows]).abs().max() <= 1e-6
    # the relative-position terms are present (random rel_pos tables), not only q.k / sqrt(d)
    assert (full - (q * attn.scale) @ k.transpose(-2, -1)).abs().max() > 1e-2


def _points(batch: int, n: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    coords = torch.rand(batch, n, 2, generator=gen) * (SIZE - 1)  # (B, n, 2) pixels of the input frame
    labels = torch.randint(0, 2, (batch, n), generator=gen)
    labels[0, -1] = -1  # a "not a point" label among the user's points
    return coords, labels


def _boxes(batch: int) -> Tensor:
    gen = torch.Generator().manual_seed(4)
    corners = torch.rand(batch, 2, 2, generator=gen) * (SIZE - 1)
    return torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)  # (B, 4) x0 y0 x1 y1


PROMPTS = ["point", "box", "point+box", "mask", "point+mask"]


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_masks_and_iou_match_transformers(sam: SamModel, hf_sam: torch.nn.Module, prompt: str, multimask: bool) -> None:
    """One image, a batch of 3 prompts (transformers' point batch), masks and IoU to 1e-5."""
    B = 1 if "mask" in prompt and prompt != "point+mask" else 3
    pixels = _pixels(1)
    coords, labels = _points(B, 2)
    boxes = _boxes(B)
    mask = torch.randn(1, 1, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(5))  # shared by the batch
    hf_args: dict[str, Tensor] = {}
    ovss_args: dict[str, object] = {}
    if "point" in prompt:
        hf_args |= {"input_points": coords[None], "input_labels": labels[None]}
        ovss_args["points"] = (coords, labels)
    if "box" in prompt:
        hf_args["input_boxes"] = boxes[None]
        ovss_args["boxes"] = boxes
    if "mask" in prompt:
        hf_args["input_masks"] = mask
        ovss_args["masks"] = mask
    with torch.no_grad():
        out = hf_sam(pixel_values=pixels, multimask_output=multimask, **hf_args)
        embedding = sam.image_encoder(pixels)
        masks, iou = sam.decode(embedding, multimask_output=multimask, **ovss_args)  # type: ignore[arg-type]
    k = 3 if multimask else 1
    assert masks.shape == (B, k, 4 * GRID, 4 * GRID) and iou.shape == (B, k)
    assert (masks - out.pred_masks[0]).abs().max() <= TOL
    assert (iou - out.iou_scores[0]).abs().max() <= TOL
    assert masks.abs().max() > 0.1


def _layer_norm_over_rows(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(C, H, W) normalised over H (dim 1) with per-channel affine: the official LayerNorm2d on 3-D input."""
    y = F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6).transpose(1, 2)  # stats over H for each (c, w)
    return weight[:, None, None] * y + bias[:, None, None]


def test_unbatched_mask_prompt_normalises_over_rows_as_the_official_code(sam: SamModel) -> None:
    """A (1, 256, 256)-style mask (Trident's release quirk): LayerNorm2d takes its statistics over the height."""
    down = sam.prompt_encoder.mask_downscaling
    mask = torch.randn(1, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(6))  # unbatched (1, H, W)
    with torch.no_grad():
        dense = sam.prompt_encoder.embed_masks(mask)  # (E, Hg, Wg)
        x = F.conv2d(mask[None], down[0].weight, down[0].bias, stride=2)[0]  # (c, 16, 16)
        x = F.gelu(_layer_norm_over_rows(x, down[1].weight, down[1].bias))
        x = F.conv2d(x[None], down[3].weight, down[3].bias, stride=2)[0]  # (C, 8, 8)
        x = F.gelu(_layer_norm_over_rows(x, down[4].weight, down[4].bias))
        expected = F.conv2d(x[None], down[6].weight, down[6].bias)[0]  # (E, 8, 8)
        batched = sam.prompt_encoder.embed_masks(mask[None])[0]  # the channel-normalised layout
        masks, iou = sam.decode(sam.image_encoder(_pixels(1)), points=_points(3, 2), masks=mask)
    assert dense.shape == (32, GRID, GRID)
    assert (dense - expected).abs().max() <= TOL
    assert (dense - batched).abs().max() > 1e-2  # the quirk changes the result
    assert masks.shape == (3, 1, 4 * GRID, 4 * GRID) and iou.shape == (3, 1)


def test_preprocess_matches_the_transformers_image_processor() -> None:
    """ResizeLongestSide + preprocess against transformers' SamImageProcessor (PIL bilinear, 1024 padding)."""
    image = (np.random.default_rng(7).random((150, 97, 3)) * 255).astype(np.uint8)
    processor = transformers.SamImageProcessorPil()
    expected = processor(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, 1024, 1024)
    resized = ResizeLongestSide(1024).apply_image(image)  # (1024, 662, 3)
    assert resized.shape == (1024, 662, 3) and resized.dtype == np.uint8
    pixels = preprocess(torch.from_numpy(resized).permute(2, 0, 1).float()[None])
    assert pixels.shape == (1, 3, 1024, 1024)
    assert (pixels - expected).abs().max() <= 1e-4  # 0-255 statistics vs x / 255 then 0-1 statistics
    assert torch.equal(pixels[..., 662:], torch.zeros(1, 3, 1024, 362))


def test_postprocess_masks_matches_the_transformers_processor() -> None:
    low_res = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(8))
    processor = transformers.SamImageProcessorPil()
    expected = processor.post_process_masks([low_res], [[150, 97]], [[1024, 662]], binarize=False)[0]
    actual = postprocess_masks(low_res, (1024, 662), (150, 97))
    assert actual.shape == (2, 3, 150, 97)
    assert (actual - expected).abs().max() <= 1e-5


def test_preprocess_shape_and_prompt_coordinates() -> None:
    assert get_preprocess_shape(384, 512, 1024) == (768, 1024)  # spec §4.12.3 VOC example
    assert get_preprocess_shape(333, 500, 1024) == (682, 1024)  # 681.98 rounds half up
    assert get_preprocess_shape(1000, 3, 1024) == (1024, 3)  # 3.072 -> 3
    resize = ResizeLongestSide(1024)
    points = resize.apply_coords(np.array([[10.0, 20.0]]), (333, 500))
    np.testing.assert_allclose(points, [[10.0 * 1024 / 500, 20.0 * 682 / 333]])
    boxes = resize.apply_boxes(torch.tensor([[1, 2, 3, 4]]), (333, 500))
    assert isinstance(boxes, Tensor) and boxes.dtype == torch.float32
    torch.testing.assert_close(boxes, torch.tensor([[1 * 2.048, 2 * 682 / 333, 3 * 2.048, 4 * 682 / 333]]))


def test_wrong_input_size_is_one_clear_error(sam: SamModel) -> None:
    with pytest.raises(
        OvssError, match=r"takes \(B, 3, 128, 128\) normalised, zero-padded images, got \(1, 3, 64, 64\)"
    ):
        sam.image_encoder(torch.zeros(1, 3, 64, 64))


def test_a_prompt_batch_equals_one_prompt_at_a_time(sam: SamModel) -> None:
    """Per-prompt masks (which transformers' layout cannot express): the batch equals separate decoder calls."""
    coords, labels = _points(3, 2)
    boxes = _boxes(3)
    masks = torch.randn(3, 1, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        embedding = sam.image_encoder(_pixels(1))
        batch, iou = sam.decode(embedding, (coords, labels), boxes, masks, multimask_output=True)
        for i in range(3):
            one, one_iou = sam.decode(
                embedding, (coords[i : i + 1], labels[i : i + 1]), boxes[i : i + 1], masks[i : i + 1], True
            )
            assert (batch[i : i + 1] - one).abs().max() <= TOL and (iou[i : i + 1] - one_iou).abs().max() <= TOL
    assert (batch[0] - batch[1]).abs().max() > 1e-2  # the prompts differ, so do the masks


def test_encoder_runs_under_autocast(sam: SamModel) -> None:
    """Reduced precision (Trident runs SAM's encoder in fp16 on GPUs): bf16 autocast on the CPU stays close."""
    pixels = _pixels(1)
    with torch.no_grad():
        reference = sam.image_encoder(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = sam.image_encoder(pixels)
    assert torch.isfinite(reduced).all()
    assert (reduced.float() - reference).abs().max() <= 0.1 * reference.abs().max()
