"""The PixelFlow transformer and the packed-stream layout it runs on."""

from pixelflow.model.layout import PackedLayout, patchify, unpatchify
from pixelflow.model.transformer import PixelFlowTransformer, count_parameters

__all__ = ["PackedLayout", "PixelFlowTransformer", "count_parameters", "patchify", "unpatchify"]
