"""The QuantizedCache series of eval/bench_kernels.py drives transformers' real quanto decode path (CPU smoke test:
the benchmark itself needs a GPU, so a broken transformers / quanto API would otherwise surface only there)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_quanto_steps_append_and_requantize():
    pytest.importorskip("optimum.quanto")
    import eval.bench_kernels as bench

    torch.manual_seed(0)
    layers = bench.quanto_layers(batch=1, kv_heads=2, tokens=200, head_dim=64, copies=2, device="cpu")
    q4 = torch.randn(1, 4, 1, 64, dtype=torch.float16)
    out = bench.quanto_step(layers[0], q4, 0.125)
    assert out.shape == (1, 4, 1, 64) and torch.isfinite(out).all()
    timing = bench.quanto_time_us(layers, q4, 0.125, steps=260)  # 130 steps per layer: one re-quantization each
    assert timing["steps"] == 260 and 0 < timing["us"] <= timing["mean_us"] * 10
    for layer, appended in zip(layers, (2 + 130, 130)):  # the direct step and the warm-up went to layers[0]
        assert layer.cumulative_length == 200 + appended
        assert layer._quantized_keys.shape[2] > 200  # the residual filled and was folded into the quantized part
        assert layer.keys.shape[-2] < 128
