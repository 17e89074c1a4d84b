"""eval/bench_quant.py counts the bytes a transformers QuantizedCache really holds, whatever its backend stores:
plain tensors, tensor subclasses (optimum-quanto) or HQQ's (codes, meta dict) pairs."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval.bench_quant as bench  # noqa: E402


def test_tensor_bytes_walks_code_and_meta_pairs():
    codes = torch.zeros(4, 16, dtype=torch.uint8)
    meta = {"scale": torch.ones(4, dtype=torch.float16), "zero": torch.ones(4, dtype=torch.float32),
            "shape": torch.Size([4, 32]), "axis": 1, "compute_dtype": torch.float32}
    assert bench._tensor_bytes(codes) == 64
    assert bench._tensor_bytes((codes, meta)) == 64 + 8 + 16
    assert bench._tensor_bytes(None) == 0


def test_hqq_cache_bytes_shrink_against_the_dynamic_cache():
    pytest.importorskip("hqq")
    from transformers import DynamicCache, LlamaConfig, QuantizedCache

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=100)
    keys, values = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    sizes = {}
    for name, cache in (("dynamic", DynamicCache(config=config)),
                        ("hqq int2", QuantizedCache(backend="hqq", config=config, nbits=2))):
        cache.update(keys, values, 0)
        sizes[name] = bench.hf_memory(cache, config)["nbytes"]
    assert sizes["dynamic"] == 2 * keys.numel() * 4
    assert sizes["hqq int2"] < sizes["dynamic"] / 4
