"""Int8 block-wise (128x128 tiles) linear layers in the TurboDiffusion checkpoint format."""

from turbowan.quant.int8_linear import TILE, Int8Linear, dequantize_blockwise, quantize_blockwise

__all__ = ["TILE", "Int8Linear", "dequantize_blockwise", "quantize_blockwise"]
