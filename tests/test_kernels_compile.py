"""The decode kernels compile for an H100 (sm_90) on a machine without a GPU: the interpreter (TRITON_INTERPRET=1,
the other kernel tests) accepts code the GPU compiler rejects, so this compiles - never launches - the split-K
kernels all the way to a cubin with Triton's bundled ptxas, behind a stand-in driver, in a subprocess without
TRITON_INTERPRET. Skipped where CUDA is present (the real kernels run there) or the harness is unavailable (another
Triton version's internals); a compile error fails.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpress.kernels.compile_only import HARNESS_UNAVAILABLE


def _compile_for_sm90() -> None:
    """Compile the multi-store kernel (one store and several) for a few store mixes (8/4/2-bit codes) and every addressing mode
    (contiguous, 16-token pages, 12-token pages), with the logit output (+ the mass kernel) and the causal chunk
    mode, a padded head dim (96), and keys per channel (run as a script)."""
    from kvpress.kernels.compile_only import install_compile_only

    compiled = install_compile_only(90)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_kernels_fixtures import make_store

    from dataclasses import replace

    from kvpress.kernels.mass import add_score_mass_triton
    from kvpress.kernels.multi import decode_attention_multi_triton, extend_attention_multi_triton
    from kvpress.kernels.store import chunk_store

    for head_dim, dtype, bounds_as_ints in ((64, torch.float16, True), (128, torch.bfloat16, False)):
        sink = make_store([0, 2], [4, 4], 2, head_dim, dtype=dtype, seed=1, device="cpu")
        middle = make_store([0, 0], [40, 40], 2, head_dim, 8, 4, head_dim, 32, torch.float32, None, 2, device="cpu")
        window = make_store([0, 0], [9, 9], 2, head_dim, dtype=dtype, seed=3, device="cpu")
        prefix = make_store([0, 3], [32, 20], 2, head_dim, 8, 4, 32, 32, torch.float32, 16, 4, device="cpu")
        stores = [sink, middle, window, prefix]
        if bounds_as_ints:
            stores[0] = replace(sink, kv_start=0, kv_end=4)
        q = torch.randn(2, 8, head_dim).to(dtype)
        decode_attention_multi_triton(q, tuple(stores[: 3 if bounds_as_ints else 4]), 0.1, out_dtype=dtype)
        decode_attention_multi_triton(q, (middle,), 0.1)
        if not bounds_as_ints:  # H2O: the logit output, and the mass pass over it
            scores = torch.empty(2, 8, 4 + 40 + 9, dtype=torch.float32)
            _, lse = decode_attention_multi_triton(q, tuple(stores[:3]), 0.1, scores=scores, score_offsets=(0, 4, 44))
            add_score_mass_triton(torch.zeros(2, 2, scores.shape[2]), scores, lse, torch.tensor([0, 2]))
        chunk = torch.randn(2, 2, 70, head_dim).to(dtype)  # extend: stored segments + the chunk itself, causal
        extend_attention_multi_triton(torch.randn(2, 8, 70, head_dim).to(dtype),
                                      (*stores[:3], chunk_store(chunk, chunk, torch.tensor([0, 5]))), 0.1, dtype)
        low_bit = make_store([0, 0], [40, 33], 2, head_dim, 4, 2, head_dim, 32, torch.float32, None, 6, device="cpu")
        decode_attention_multi_triton(q, (stores[0], low_bit, window), 0.1, out_dtype=dtype)  # int4-int2 middle
        int2 = make_store([0, 2], [40, 33], 2, head_dim, 2, 2, 16, 16, torch.float32, 16, 7, device="cpu")
        decode_attention_multi_triton(q, (int2,), 0.1)  # int2-int2, paged
        if bounds_as_ints:  # the general paged path (page size no power of two: runtime division)
            paged12 = make_store([0, 1], [30, 17], 2, head_dim, 8, 4, head_dim, 32, torch.float32, 12, 5, device="cpu")
            decode_attention_multi_triton(q, (paged12,), 0.1)
    # head_dim 96 (Phi-3): each half padded from 48 to a tile of 64, masked (kernels/shapes.py)
    sink96 = make_store([0, 2], [4, 4], 2, 96, dtype=torch.float16, seed=8, device="cpu")
    middle96 = make_store([0, 0], [40, 33], 2, 96, 8, 4, 96, 16, torch.float32, 16, 9, device="cpu")
    int2_96 = make_store([0, 1], [40, 33], 2, 96, 2, 2, 8, 48, torch.float32, None, 10, device="cpu")
    q96 = torch.randn(2, 8, 96).half()
    decode_attention_multi_triton(q96, (sink96, middle96, int2_96), 0.1, out_dtype=torch.float16)
    chunk96 = torch.randn(2, 2, 40, 96).half()
    extend_attention_multi_triton(torch.randn(2, 8, 40, 96).half(),
                                  (middle96, chunk_store(chunk96, chunk96, torch.tensor([0, 5]))), 0.1)
    # keys per channel over blocks of 64 tokens (KIVI, int2-int2's default): attention and quantize-and-store
    from kvpress.kernels.affine import quantize, quantize_channels
    from kvpress.kernels.quantize import quantize_store_triton
    from kvpress.kernels.store import KVStore

    keys, values = torch.randn(2, 2, 128, 64), torch.randn(2, 2, 128, 64)
    (kc, ks, kz), (vc, vs, vz) = quantize_channels(keys, 2, 64), quantize(values, 2, 64)
    table = torch.arange(2, dtype=torch.int32)[:, None]
    channel = KVStore(k=kc, v=vc, block_table=table, kv_end=128, k_bits=2, v_bits=2, k_scale=ks, k_zero=kz,
                      v_scale=vs, v_zero=vz, k_block=64)
    sink64 = make_store([0, 2], [4, 4], 2, 64, dtype=torch.float16, seed=11, device="cpu")
    decode_attention_multi_triton(torch.randn(2, 8, 64).half(), (sink64, channel), 0.1, out_dtype=torch.float16)
    quantize_store_triton(keys[:, :, :64].half(), kc, ks, kz, table, torch.zeros(2, dtype=torch.int32), 2, None,
                          check_values=False, token_block=64)
    compiled = [(name, len(kernel.asm["cubin"])) for name, kernel in compiled]
    names = {name for name, size in compiled if size > 0}
    assert {"_multi_split_attention_kernel", "_combine_splits_kernel", "_add_score_mass_kernel",
            "_quantize_channels_kernel"} <= names, compiled
    print("compiled", compiled)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the kernels really run in the other tests")
def test_decode_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == HARNESS_UNAVAILABLE:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


if __name__ == "__main__":
    _compile_for_sm90()
