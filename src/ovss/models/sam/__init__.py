"""Segment Anything (SAM) inside ovss: image encoder, prompt encoder, mask decoder, transforms and loader.

Used by Trident (spec §4.12): block 11 of the image encoder gives the global affinity, the prompt encoder
and mask decoder refine the coarse labels. ``load_sam("sam-vitb")`` returns a :class:`SamModel`.
"""

from ovss.models.sam.image_encoder import SamAttention, SamBlock, SamEncoderConfig, SamImageEncoder
from ovss.models.sam.loader import convert_sam_state_dict, load_sam, load_sam_state_dict
from ovss.models.sam.mask_decoder import MaskDecoder
from ovss.models.sam.model import SamConfig, SamModel, build_sam, sam_config
from ovss.models.sam.prompt_encoder import PromptEncoder
from ovss.models.sam.transforms import ResizeLongestSide, get_preprocess_shape, postprocess_masks, preprocess

__all__ = [
    "MaskDecoder",
    "PromptEncoder",
    "ResizeLongestSide",
    "SamAttention",
    "SamBlock",
    "SamConfig",
    "SamEncoderConfig",
    "SamImageEncoder",
    "SamModel",
    "build_sam",
    "convert_sam_state_dict",
    "get_preprocess_shape",
    "load_sam",
    "load_sam_state_dict",
    "postprocess_masks",
    "preprocess",
    "sam_config",
]
