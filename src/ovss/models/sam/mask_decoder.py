"""SAM's mask decoder: prompt tokens + image embedding -> low-resolution mask logits and predicted IoU.

Follows segment-anything ``modeling/mask_decoder.py``: an IoU token and ``1 + num_multimask_outputs`` mask
tokens are prepended to the prompt tokens; the image embedding is repeated once per prompt (the decoder
batch is the prompt batch of ONE image) and the dense prompt embedding added; the two-way transformer runs;
the image tokens are up-scaled 4x by two transposed convolutions; each mask token's hypernetwork MLP gives
the weights of a dot product with the up-scaled map. ``multimask_output=True`` returns mask tokens 1..3,
``False`` mask token 0, with their IoU predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ovss.models.sam.common import MLP, LayerNorm2d
from ovss.models.sam.transformer import TwoWayTransformer

__all__ = ["MaskDecoder"]


class MaskDecoder(nn.Module):
    """Predicts masks from an image embedding and prompt embeddings with a two-way transformer."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        E = transformer_dim
        self.transformer_dim = E
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, E)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, E)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(E, E // 4, kernel_size=2, stride=2),
            LayerNorm2d(E // 4),
            nn.GELU(),
            nn.ConvTranspose2d(E // 4, E // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(E, E, E // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(E, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """Masks and their predicted IoU for a batch of prompts on one image.

        Args:
            image_embeddings: (1, E, Hg, Wg) embedding of one image (repeated per prompt).
            image_pe: (1, E, Hg, Wg) from :meth:`PromptEncoder.get_dense_pe`.
            sparse_prompt_embeddings: (B, n, E) point and box embeddings, B = number of prompts.
            dense_prompt_embeddings: (B, E, Hg, Wg) mask embeddings (or anything broadcasting to it).
            multimask_output: three masks (tokens 1..3) instead of one (token 0).

        Returns:
            ``(masks, iou)``: (B, k, 4 Hg, 4 Wg) low-resolution mask logits (256 x 256 for SAM) and (B, k)
            predicted IoU, k = 3 with ``multimask_output`` else 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice, :, :], iou_pred[:, mask_slice]  # (B, k, 4Hg, 4Wg), (B, k)

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """All ``num_mask_tokens`` masks and IoU predictions: (B, T, 4Hg, 4Wg) and (B, T)."""
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + T, E)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)  # (B, 1+T, E)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # (B, 1 + T + n, E)

        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)  # (B, E, Hg, Wg) per prompt
        src = src + dense_prompt_embeddings  # (B, E, Hg, Wg)
        pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)  # (B, E, Hg, Wg)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)  # (B, 1 + T + n, E), (B, Hg * Wg, E)
        iou_token_out = hs[:, 0, :]  # (B, E)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # (B, T, E)

        src = src.transpose(1, 2).reshape(b, c, h, w)  # (B, E, Hg, Wg)
        upscaled = self.output_upscaling(src)  # (B, E / 8, 4 Hg, 4 Wg)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, T, E / 8)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)  # (B, T, 4 Hg, 4 Wg)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, T)
        return masks, iou_pred
