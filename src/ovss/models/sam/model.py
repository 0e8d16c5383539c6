"""SAM (segment-anything) as one module, built from the shapes of its weights.

``build_sam(state_dict)`` reads every size off the tensors (as openai/CLIP's ``build_model``): encoder width,
depth, patch, grid, window size and global blocks (windowed blocks have ``2w - 1`` relative positions,
global ones ``2G - 1``), prompt width, mask channels, decoder depth, MLP widths and IoU head. The one fact
the weights cannot tell, the decoder's attention heads, is an argument (8 in every released SAM).
State-dict keys are the official ones (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) with
the encoder's fused ``attn.qkv`` named ``attn.in_proj_*`` (see :mod:`ovss.models.sam.image_encoder`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ovss.models.sam.image_encoder import SamEncoderConfig, SamImageEncoder
from ovss.models.sam.mask_decoder import MaskDecoder
from ovss.models.sam.prompt_encoder import PromptEncoder
from ovss.models.sam.transformer import TwoWayTransformer
from ovss.models.vit_build import load_frozen

__all__ = ["SAM_DECODER_HEADS", "SamConfig", "SamModel", "build_sam", "sam_config"]

SAM_DECODER_HEADS = 8  # attention heads of the mask decoder in every released SAM (ViT-B, -L, -H)


@dataclass(frozen=True)
class SamConfig:
    """Architecture of a :class:`SamModel`; :func:`sam_config` reads it off the weights."""

    encoder: SamEncoderConfig  # the image encoder
    prompt_dim: int  # prompt / decoder token width E (256)
    mask_in_chans: int  # hidden channels of the mask prompt down-scaling (16)
    decoder_depth: int  # two-way transformer blocks (2)
    decoder_heads: int  # decoder attention heads (8; not readable from the weights)
    decoder_mlp_dim: int  # MLP width of the two-way blocks (2048)
    downsample_rate: int  # cross-attention width is E / downsample_rate (2)
    num_multimask_outputs: int  # masks returned with multimask_output=True (3)
    iou_head_depth: int  # linear layers of the IoU head (3)
    iou_head_hidden_dim: int  # hidden width of the IoU head (256)


class SamModel(nn.Module):
    """Image encoder, prompt encoder and mask decoder of SAM (inputs: see :mod:`ovss.models.sam.transforms`)."""

    mask_threshold: float = 0.0  # logits above it are inside the mask

    def __init__(self, cfg: SamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.image_encoder = SamImageEncoder(enc)
        self.prompt_encoder = PromptEncoder(
            cfg.prompt_dim, (enc.grid, enc.grid), (enc.image_size, enc.image_size), cfg.mask_in_chans
        )
        transformer = TwoWayTransformer(
            cfg.decoder_depth, cfg.prompt_dim, cfg.decoder_heads, cfg.decoder_mlp_dim, cfg.downsample_rate
        )
        self.mask_decoder = MaskDecoder(
            cfg.prompt_dim, transformer, cfg.num_multimask_outputs, cfg.iou_head_depth, cfg.iou_head_hidden_dim
        )

    @property
    def img_size(self) -> int:
        """Side of the square encoder input in pixels (1024)."""
        return self.image_encoder.img_size

    def decode(
        self,
        image_embedding: Tensor,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Prompt encoder then mask decoder on the embedding of one image.

        Args:
            image_embedding: (1, E, Hg, Wg) from ``image_encoder``.
            points: ((B, n, 2) float pixel coordinates (x, y) in the encoder's input frame, (B, n) labels).
            boxes: (B, 4) float pixel boxes (x0, y0, x1, y1) in the encoder's input frame.
            masks: (B, 1, 4 Hg, 4 Wg) low-resolution mask logits (or unbatched (1, 4 Hg, 4 Wg)).
            multimask_output: three masks per prompt instead of one.

        Returns:
            ``(low_res_masks, iou)``: (B, k, 4 Hg, 4 Wg) logits and (B, k) predicted IoU, k = 3 or 1.
        """
        sparse, dense = self.prompt_encoder(points, boxes, masks)  # (B, n', E), (B, E, Hg, Wg)
        return self.mask_decoder(image_embedding, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    """Number of distinct indices i of keys matching ``pattern`` (a regex with one ``(\\d+)`` group)."""
    found = {int(m[1]) for k in sd if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise ValueError(f"indices of {pattern} are not 0..n-1: {sorted(found)}")
    return len(found)


def sam_config(sd: dict[str, Tensor], decoder_heads: int = SAM_DECODER_HEADS) -> SamConfig:
    """The architecture implied by a state dict in ovss's layout.

    Raises:
        KeyError: a tensor the architecture is read from is missing.
        ValueError: shapes that do not form a SAM (e.g. windowed blocks with different windows).
    """
    E = "image_encoder."
    conv = sd[E + "patch_embed.proj.weight"]  # (D, 3, p, p)
    pos = sd[E + "pos_embed"]  # (1, G, G, D)
    width, patch, grid = conv.shape[0], conv.shape[-1], pos.shape[1]
    if conv.dim() != 4 or conv.shape[1] != 3 or pos.shape != (1, grid, grid, width):
        raise ValueError(f"patch embedding {tuple(conv.shape)} and position table {tuple(pos.shape)} do not match")
    depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
    head_dim = sd[E + "blocks.0.attn.rel_pos_h"].shape[1]
    windows: set[int] = set()
    global_blocks: list[int] = []
    for i in range(depth):
        length = sd[f"{E}blocks.{i}.attn.rel_pos_h"].shape[0]  # 2 * side - 1
        if length == 2 * grid - 1:
            global_blocks.append(i)
        else:
            windows.add((length + 1) // 2)
    if len(windows) > 1:
        raise ValueError(f"windowed blocks use different window sizes {sorted(windows)}")
    encoder = SamEncoderConfig(
        patch=patch,
        width=width,
        depth=depth,
        heads=width // head_dim,
        grid=grid,
        window=windows.pop() if windows else grid,
        global_blocks=tuple(global_blocks),
        mlp_dim=sd[E + "blocks.0.mlp.lin1.weight"].shape[0],
        out_chans=sd[E + "neck.0.weight"].shape[0],
        qkv_bias=E + "blocks.0.attn.in_proj_bias" in sd,
    )
    P, D = "prompt_encoder.", "mask_decoder."
    prompt_dim = sd[P + "no_mask_embed.weight"].shape[1]
    return SamConfig(
        encoder=encoder,
        prompt_dim=prompt_dim,
        mask_in_chans=sd[P + "mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        decoder_heads=decoder_heads,
        decoder_mlp_dim=sd[D + "transformer.layers.0.mlp.lin1.weight"].shape[0],
        downsample_rate=prompt_dim // sd[D + "transformer.final_attn_token_to_image.q_proj.weight"].shape[0],
        num_multimask_outputs=sd[D + "mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_head_hidden_dim=sd[D + "iou_prediction_head.layers.0.weight"].shape[0],
    )


def build_sam(sd: dict[str, Tensor], decoder_heads: int = SAM_DECODER_HEADS) -> SamModel:
    """A :class:`SamModel` in eval mode holding ``sd`` (ovss layout), fp32 on the CPU.

    Raises:
        KeyError, ValueError: the tensors do not form a SAM: a tensor the sizes are read from is missing, or
            keys missing / unexpected / mis-shaped (the loader turns these into one
            :class:`~ovss.errors.OvssError` line naming the file).
    """
    model = SamModel(sam_config(sd, decoder_heads))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [
            f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong))
            if keys
        ]
        raise ValueError("; ".join(parts))
    load_frozen(model, {k: v.to(torch.float32) for k, v in sd.items()})  # frozen, the checkpoint's own tensors
    return model
