"""KV quantization codec: spec parsing, per-group int8/int4 quantize/dequantize, split-halves int4 packing."""
from kvpress.quant.codec import dequantize, group_scale_zero, quantize
from kvpress.quant.groups import code_width, effective_group_size, group_count
from kvpress.quant.packing import pack_int4, unpack_int4
from kvpress.quant.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "quantize",
    "dequantize",
    "pack_int4",
    "unpack_int4",
    "group_scale_zero",
    "effective_group_size",
    "group_count",
    "code_width",
]
