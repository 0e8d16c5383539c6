"""SAM's prompt encoder: points, boxes and masks to sparse and dense embeddings (segment-anything semantics).

Coordinates are pixels of the resized, padded encoder input (long side 1024, see
:mod:`ovss.models.sam.transforms`), (x, y) order. Points and box corners are shifted by 0.5 to pixel
centres and encoded with random Fourier features of the normalised position; labels: 1 foreground,
0 background, -1 "not a point" (padding). Without a box, one padding point (label -1) is appended to the
points, as the official code does. Masks are low-resolution logits (B, 1, 4 Hg, 4 Wg) (256 x 256 for SAM),
down-scaled by two stride-2 convolutions with LayerNorm2d and GELU and a 1x1 convolution.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from ovss.models.sam.common import LayerNorm2d

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]


class PositionEmbeddingRandom(nn.Module):
    """Random spatial-frequency encoding: [sin(2 pi (2c - 1) G), cos(...)] of coordinates c in [0, 1]^2."""

    positional_encoding_gaussian_matrix: Tensor

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.zeros(2, num_pos_feats))  # (2, F)

    def encode(self, coords: Tensor) -> Tensor:
        """(..., 2) coordinates normalised to [0, 1] -> (..., 2F) features."""
        coords = 2 * coords - 1  # (..., 2) in [-1, 1]
        coords = coords @ self.positional_encoding_gaussian_matrix  # (..., F)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., 2F)

    def grid(self, size: tuple[int, int]) -> Tensor:
        """Encoding of the centres of an (h, w) grid of cells: (2F, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ones = torch.ones((h, w), device=device, dtype=torch.float32)
        y = (ones.cumsum(dim=0) - 0.5) / h  # (h, w) cell-centre rows in (0, 1)
        x = (ones.cumsum(dim=1) - 0.5) / w  # (h, w) cell-centre columns in (0, 1)
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)  # (2F, h, w)

    def with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(B, n, 2) pixel coordinates (x, y) of an (H, W) image -> (B, n, 2F)."""
        coords = coords.clone()
        coords[:, :, 0] = coords[:, :, 0] / image_size[1]
        coords[:, :, 1] = coords[:, :, 1] / image_size[0]
        return self.encode(coords.to(torch.float))  # (B, n, 2F)


class PromptEncoder(nn.Module):
    """Embeds point, box and mask prompts for :class:`ovss.models.sam.mask_decoder.MaskDecoder`."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        """Args:
        embed_dim: prompt embedding width E (256).
        image_embedding_size: (Hg, Wg) of the image embedding (64, 64).
        input_image_size: (H, W) of the padded encoder input in pixels (1024, 1024).
        mask_in_chans: hidden channels of the mask down-scaling (16).
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left corner, 3: box bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def point_embedding(self, i: int) -> Tensor:
        """(1, E) learned embedding i: 0 background point, 1 foreground point, 2 / 3 box corners."""
        return cast("nn.Embedding", self.point_embeddings[i]).weight

    def get_dense_pe(self) -> Tensor:
        """Positional encoding of the image-embedding grid: (1, E, Hg, Wg)."""
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)  # (1, E, Hg, Wg)

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """(B, n, 2) pixel points and (B, n) labels -> (B, n (+1 if pad), E)."""
        points = points + 0.5  # shift to the pixel centre
        if pad:
            padding_point = torch.zeros((points.shape[0], 1, 2), device=points.device)  # (B, 1, 2)
            padding_label = -torch.ones((labels.shape[0], 1), device=labels.device)  # (B, 1)
            points = torch.cat([points, padding_point], dim=1)  # (B, n + 1, 2)
            labels = torch.cat([labels, padding_label], dim=1)  # (B, n + 1)
        embedding = self.pe_layer.with_coords(points, self.input_image_size)  # (B, n', E)
        embedding[labels == -1] = 0.0
        embedding[labels == -1] += self.not_a_point_embed.weight
        embedding[labels == 0] += self.point_embedding(0)
        embedding[labels == 1] += self.point_embedding(1)
        return embedding

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """(B, 4) pixel boxes (x0, y0, x1, y1) -> (B, 2, E) corner embeddings."""
        boxes = boxes + 0.5  # shift to the pixel centre
        coords = boxes.reshape(-1, 2, 2)  # (B, 2, 2): top-left, bottom-right
        corners = self.pe_layer.with_coords(coords, self.input_image_size)  # (B, 2, E)
        corners[:, 0, :] += self.point_embedding(2)
        corners[:, 1, :] += self.point_embedding(3)
        return corners

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(B, 1, 4 Hg, 4 Wg) mask logits -> (B, E, Hg, Wg); an unbatched (1, 4 Hg, 4 Wg) -> (E, Hg, Wg)."""
        return self.mask_downscaling(masks)

    def forward(
        self, points: tuple[Tensor, Tensor] | None, boxes: Tensor | None, masks: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Sparse and dense prompt embeddings.

        Args:
            points: (coords (B, n, 2) float pixels (x, y), labels (B, n) with 1 / 0 / -1), or None.
            boxes: (B, 4) float pixels (x0, y0, x1, y1), or None.
            masks: (B, 1, 4 Hg, 4 Wg) low-resolution mask logits, or None. An unbatched (1, 4 Hg, 4 Wg)
                tensor is accepted as the official code does (its LayerNorm2d then normalises over rows).

        Returns:
            ``(sparse, dense)``: (B, n_points + 2 n_boxes (+1 padding point), E) and (B, E, Hg, Wg)
            (E, Hg, Wg for an unbatched mask; it broadcasts over the batch in the decoder).
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)  # (B, 0, E)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self.embed_points(coords, labels, pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)  # (B, n + 2, E)
        if masks is not None:
            dense = self.embed_masks(masks)  # (B, E, Hg, Wg)
        else:
            Hg, Wg = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, Hg, Wg)  # (B, E, Hg, Wg)
        return sparse, dense
