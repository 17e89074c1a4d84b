"""KV quantization: QuantSpec (what a cache quantizes), the KVCodec interface and its registered codecs; the per-group
int8/int4 math and split-halves packing are re-exported from kvpress.kernels (shared with the store kernel)."""
from kvpress.kernels.affine import dequantize, group_scale_zero, quantize
from kvpress.kernels.affine_layout import code_width, effective_group_size, group_count, pack_int4, unpack_int4
from kvpress.quant.affine import AffineCodec
from kvpress.quant.codec_base import KVCodec
from kvpress.quant.full_precision import FullPrecisionCodec
from kvpress.quant.registry import CODECS, codec_class, register_codec
from kvpress.quant.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "KVCodec",
    "AffineCodec",
    "FullPrecisionCodec",
    "CODECS",
    "codec_class",
    "register_codec",
    "quantize",
    "dequantize",
    "pack_int4",
    "unpack_int4",
    "group_scale_zero",
    "effective_group_size",
    "group_count",
    "code_width",
]
