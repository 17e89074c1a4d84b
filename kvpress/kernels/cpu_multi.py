"""Decode over several stores on the CPU: the compiled kernel (cpu_decode) for every quantized store it takes, with
the plain 16-bit stores (fp sinks and window) read in place in the first one's softmax; the torch twin for any other store;
their partial results merged by log-sum-exp. Same signature and results as the twin
(reference.decode_attention_multi_reference), which stays the oracle."""
from __future__ import annotations

import torch

from kvpress.kernels import cpu_decode
from kvpress.kernels.merge import merge_attention_states
from kvpress.kernels.reference import decode_attention_multi_reference
from kvpress.kernels.store import KVStore, check_decode_query, check_score_args, check_stores, row_bounds


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
    if not coded or not cpu_decode.available():
        return decode_attention_multi_reference(q, stores, sm_scale, out_dtype, scores=scores,
                                                score_offsets=score_offsets)
    # with scores every store's logits go to its own columns, so the plain stores stay with the twin then
    plain = [] if scores is not None else [i for i, store in enumerate(stores) if cpu_decode.joins(store, head_dim)]
    plain = plain[: cpu_decode.MAX_PLAIN]
    qs = (q.float() * sm_scale).view(batch, kv_heads, rows, head_dim)
    parts = []
    for n, i in enumerate(coded):
        store = stores[i]
        rotated_q = qs if store.k_rotation is None else qs @ store.k_rotation
        joined = tuple(stores[j] for j in plain) if n == 0 else ()  # the plain stores join the first one's softmax
        columns = None if scores is None else _score_columns(scores, store, score_offsets[i], batch)
        result = cpu_decode.decode_store(rotated_q, store, joined, None if store.k_rotation is None else qs,
                                         store.v_rotation is not None, columns)
        out = result.out if store.v_rotation is None else result.out @ store.v_rotation.T
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


def _score_columns(scores: torch.Tensor, store: KVStore, offset: int, batch: int) -> torch.Tensor:
    """The columns of `scores` from the store's token 0 on, checked to hold every token a row attends (the kernel
    writes raw memory)."""
    end = store.kv_end if isinstance(store.kv_end, int) else int(row_bounds(store, batch, scores.device)[1].max())
    if offset + end > scores.shape[2]:
        raise ValueError(f"scores has {scores.shape[2]} columns; a store at offset {offset} attends up to token {end}")
    return scores[:, :, offset:]
