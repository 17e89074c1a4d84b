"""Decode over several stores on the CPU: the compiled kernel (cpu_decode) for every quantized store it takes, with
the plain 16-bit stores (fp sinks and window; or those alone, H2O over a 16-bit cache) read in place in the first
call's softmax; the torch twin for any other store; partial results merged by log-sum-exp. Same signature and
results as the twin (reference.decode_attention_multi_reference), which stays the oracle."""
from __future__ import annotations

import torch

from kvpress.kernels import cpu_decode
from kvpress.kernels.merge import merge_attention_states
from kvpress.kernels.reference import decode_attention_multi_reference
from kvpress.kernels.store import KVStore, check_decode_query, check_score_args, check_stores


def decode_attention_multi_cpu(
    q: torch.Tensor,
    stores: tuple[KVStore, ...],
    sm_scale: float,
    out_dtype: torch.dtype | None = None,
    *,
    scores: torch.Tensor | None = None,
    score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, D) -> out (B, Hq, D) float32 (or `out_dtype`), natural-log lse (B, Hq), like the twin; with
    `scores`, each attended token's log2-domain logit at column score_offsets[store] + token."""
    check_stores(q, stores)
    check_decode_query(q)
    check_score_args(q, stores, scores, score_offsets)
    batch, q_heads, head_dim = q.shape
    kv_heads = stores[0].k.shape[1]
    rows = q_heads // kv_heads
    coded = [i for i, store in enumerate(stores) if cpu_decode.takes(store, rows, head_dim)]
    plain = [i for i, store in enumerate(stores) if cpu_decode.joins(store, head_dim)][: cpu_decode.MAX_PLAIN]
    if not (coded or plain) or not cpu_decode.available():
        return decode_attention_multi_reference(q, stores, sm_scale, out_dtype, scores=scores,
                                                score_offsets=score_offsets)
    qs = (q.float() * sm_scale).view(batch, kv_heads, rows, head_dim)
    parts = []
    for n, i in enumerate(coded or [None]):  # None: plain stores alone
        store = None if i is None else stores[i]
        joined = list(plain) if n == 0 else []  # the plain stores join the first call's softmax
        rotated = store is not None and store.k_rotation is not None
        offsets = () if scores is None else tuple(score_offsets[j] for j in ([] if i is None else [i]) + joined)
        result = cpu_decode.decode_store(qs @ store.k_rotation if rotated else qs, store,
                                         tuple(stores[j] for j in joined), qs if rotated else None,
                                         store is not None and store.v_rotation is not None, scores, offsets)
        out = result.out if store is None or store.v_rotation is None else result.out @ store.v_rotation.T
        if result.plain_out is not None:
            out = out.add_(result.plain_out)
        parts.append((out.view(batch, q_heads, head_dim), result.lse.view(batch, q_heads)))
    rest = [i for i in range(len(stores)) if i not in coded and i not in plain]
    if rest:
        offsets = None if scores is None else tuple(score_offsets[i] for i in rest)
        parts.append(decode_attention_multi_reference(q, tuple(stores[i] for i in rest), sm_scale, scores=scores,
                                                      score_offsets=offsets))
    out, lse = parts[0]
    for other_out, other_lse in parts[1:]:
        out, lse = merge_attention_states(out, lse, other_out, other_lse)
    return (out if out_dtype is None else out.to(out_dtype)), lse

