"""Quantized bases (chapter 09): the NF4 data type with double quantization, and QLoRA's
4-bit linear layer that LoRA wraps."""

from .nf4 import NF4Tensor, fp4_levels, int4_levels, nf4_levels, nf4_nbytes, quantize_nf4
from .qlora import Linear4bit, NF4Config, dequantize_model

__all__ = [
    "Linear4bit",
    "NF4Config",
    "NF4Tensor",
    "dequantize_model",
    "fp4_levels",
    "int4_levels",
    "nf4_levels",
    "nf4_nbytes",
    "quantize_nf4",
]
