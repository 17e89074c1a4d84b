"""Public kernel entry points: the Triton kernel for CUDA inputs, the torch twin otherwise; on the CPU, decode runs
the compiled C kernel (cpu_multi) for the stores it takes unless a backend is forced.

KVPRESS_KERNELS=triton|reference (read once, at import) forces one backend for the whole process; tests and
benchmarks switch with `use_backend(...)`. Triton on CPU needs TRITON_INTERPRET=1 set before triton is imported.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from kvpress.kernels.cpu_multi import decode_attention_multi_cpu
from kvpress.kernels.mass import add_score_mass_reference, add_score_mass_triton
from kvpress.kernels.merge import merge_attention_states
from kvpress.kernels.multi import decode_attention_multi_triton, extend_attention_multi_triton
from kvpress.kernels.reference import decode_attention_multi_reference, extend_attention_multi_reference
from kvpress.kernels.store import KVStore
from kvpress.kernels.triton_compat import HAS_TRITON

BACKEND_ENV = "KVPRESS_KERNELS"
BACKENDS = ("triton", "reference")


def _checked_backend(name: str | None, source: str) -> str | None:
    """A forced backend name, validated ("" / "auto" / None: choose by device)."""
    name = (name or "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source} must be 'triton', 'reference' or unset; got {name!r}")
    if name == "triton" and not HAS_TRITON:
        raise ValueError(f"{source}=triton but triton is not installed; unset it or install triton")
    return name


_forced: str | None = _checked_backend(os.environ.get(BACKEND_ENV), BACKEND_ENV)


def kernel_backend(device: torch.device) -> str:
    """"triton" or "reference" for inputs on `device`: the forced backend if any, else Triton for CUDA tensors."""
    if _forced is not None:
        return _forced
    return "triton" if HAS_TRITON and device.type == "cuda" else "reference"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force "triton" or "reference" (None / "auto": by device) inside the block, then restore the previous choice."""
    global _forced
    previous, _forced = _forced, _checked_backend(name, "use_backend")
    try:
        yield
    finally:
        _forced = previous


def decode_attention_multi(
    q: torch.Tensor,
    stores: tuple[KVStore, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row/head over 1..5 stores at once (one split-K launch + one combine on Triton): q (B, Hq, D)
    -> out (B, Hq, D) float32 (or `out_dtype`), natural-log lse (B, Hq) float32, exactly merged over the stores.

    With `scores` (float32 (B, Hq, L)), also writes every attended token's log2-domain logit at column
    score_offsets[store] + token, for add_score_mass."""
    backend = kernel_backend(q.device)
    if backend == "triton":
        impl = decode_attention_multi_triton
    elif _forced is None and q.device.type == "cpu":  # forced "reference": the twin alone, the kernels' oracle
        impl = decode_attention_multi_cpu
    else:
        impl = decode_attention_multi_reference
    return impl(q, stores, sm_scale, out_dtype, scores=scores, score_offsets=score_offsets)


def extend_attention_multi(
    q: torch.Tensor, stores: tuple[KVStore, ...], sm_scale: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of queries q (B, Hq, Q, D) over 1..5 stores at once (one split-K launch + one combine on Triton),
    exactly merged -> out (B, Hq, Q, D) float32 (or `out_dtype`), natural-log lse (B, Hq, Q) float32. A causal
    store (chunk_store) is seen by query i up to its token i."""
    impl = extend_attention_multi_triton if kernel_backend(q.device) == "triton" else extend_attention_multi_reference
    return impl(q, stores, sm_scale, out_dtype)


def add_score_mass(
    mass: torch.Tensor, scores: torch.Tensor, lse: torch.Tensor, kv_start: torch.Tensor | None
) -> torch.Tensor:
    """H2O: add this step's attention mass (B, Hkv, L), from the logits decode_attention_multi stored in `scores`
    and the final lse (B, Hq), to `mass` in place for tokens >= kv_start (left padding untouched)."""
    impl = add_score_mass_triton if kernel_backend(mass.device) == "triton" else add_score_mass_reference
    return impl(mass, scores, lse, kv_start)


def quantize_store(*args: Any, **kwargs: Any) -> Any:
    """Quantize tokens into the store (kvpress.kernels.quantize), Triton for CUDA inputs, torch otherwise."""
    from kvpress.kernels import quantize  # lazy: written separately, imported only when used

    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("quantize_store needs tensor arguments to choose a device")
    if kernel_backend(tensors[0].device) == "triton":
        return quantize.quantize_store_triton(*args, **kwargs)
    return quantize.quantize_store_reference(*args, **kwargs)


__all__ = [
    "KVStore",
    "add_score_mass",
    "decode_attention_multi",
    "extend_attention_multi",
    "kernel_backend",
    "merge_attention_states",
    "quantize_store",
    "use_backend",
]
