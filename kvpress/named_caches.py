"""Named Cache subclasses for the common cases, for `model.generate(past_key_values=...)` on a wrapped model."""
from __future__ import annotations

from typing import Any

from .cache import KVPressCache
from .presses import H2OPress, SnapKVPress


class SnapKVCache(KVPressCache):
    """KVPressCache with SnapKV: keep the tokens the last `window_size` prompt queries attend to most."""

    def __init__(self, config, compression_ratio: float = 0.5, window_size: int = 64, kernel_size: int = 5,
                 quant: Any = None, **kwargs: Any) -> None:
        press = SnapKVPress(compression_ratio=compression_ratio, window_size=window_size, kernel_size=kernel_size)
        super().__init__(config, press=press, quant=quant, **kwargs)


class H2OCache(KVPressCache):
    """KVPressCache with H2O: heavy hitters + recent tokens; `max_tokens` also bounds the cache while decoding."""

    def __init__(self, config, compression_ratio: float = 0.0, max_tokens: int | None = None, recent: int = 32,
                 quant: Any = None, **kwargs: Any) -> None:
        press = H2OPress(compression_ratio=compression_ratio, max_tokens=max_tokens, recent=recent)
        super().__init__(config, press=press, quant=quant, **kwargs)


class QuantizedKVCache(KVPressCache):
    """KVPressCache storing int8 keys / int4 values (or another QuantSpec) with a full-precision recent window."""

    def __init__(self, config, quant: Any = "int8-int4", press: Any = None, **kwargs: Any) -> None:
        super().__init__(config, press=press, quant=quant, **kwargs)
