"""Context replay for KVzip: run the model over "repeat prompt + the context" on top of the stored context KV and
reduce, per layer, the attention every stored context token receives to one score per (row, kv head, token).

This is the one press module that runs the model (from `BasePress.prepare_compression`, i.e. at cache level): it
temporarily switches the model to an attention function registered with transformers' AttentionInterface that
computes each chunk's attention over [stored context, repeat tokens so far], records max-over-queries-and-group
probabilities of the context columns, and returns the ordinary attention output. Memory: one chunk's probabilities
(B, Hq, chunk, T + R) and the repeat K/V (as large as the context's) per layer, freed when the replay ends.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

REPLAY_ATTENTION = "kvpress_kvzip_replay"
_ACTIVE = threading.local()  # the replay running on this thread (the registered function is global)


@dataclass
class _LayerReplay:
    """One layer's context (stored K/V, attended mask), the repeat K/V computed so far and the running scores."""

    keys: torch.Tensor  # (B, Hkv, T, D)
    values: torch.Tensor
    valid: torch.Tensor  # (B, T) bool
    scores: torch.Tensor | None  # (B, Hkv, T) float32 running max, None for layers that are not scored
    rep_keys: list[torch.Tensor] = field(default_factory=list)
    rep_values: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Replay:
    """What the registered attention function reads during one replay forward."""

    layers: dict[int, _LayerReplay]
    rep_valid: torch.Tensor  # (B, R) bool: real tokens of the repeat sequence (False: left padding)
    start: int = 0  # index in the repeat sequence of the current chunk's first token


def _replay_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of a repeat chunk over [stored context, repeat so far, the chunk] (causal, padding masked); records
    the context tokens' max attention probability (over real queries and the kv group's heads)."""
    replay: _Replay = _ACTIVE.replay
    state = replay.layers[module.layer_idx]
    batch, n_heads, n_q, head_dim = query.shape
    kv_heads = key.shape[1]
    group = n_heads // kv_heads
    scaling = head_dim ** -0.5 if scaling is None else scaling
    start, n_ctx = replay.start, state.keys.shape[2]
    keys = torch.cat([state.keys.to(key.dtype), *state.rep_keys, key], dim=2)
    values = torch.cat([state.values.to(value.dtype), *state.rep_values, value], dim=2)
    state.rep_keys.append(key)
    state.rep_values.append(value)
    rep_len = start + n_q
    q_index = torch.arange(start, rep_len, device=query.device)
    rep_visible = torch.arange(rep_len, device=query.device)[None, :] <= q_index[:, None]  # (Q, R') causal
    rep_visible = rep_visible[None] & replay.rep_valid[:, None, :rep_len]  # (B, Q, R')
    ctx_visible = state.valid[:, None, :].expand(batch, n_q, n_ctx)
    visible = torch.cat([ctx_visible, rep_visible], dim=2)  # (B, Q, T + R')
    q = query.float().reshape(batch, kv_heads, group, n_q, head_dim)
    logits = torch.matmul(q, keys.float()[:, :, None].transpose(-1, -2)) * scaling  # (B, Hkv, G, Q, T + R')
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    if state.scores is not None:
        real_q = replay.rep_valid[:, start:rep_len]  # (B, Q)
        ctx = probs[..., :n_ctx].masked_fill(~real_q[:, None, None, :, None], 0.0)
        state.scores = torch.maximum(state.scores, ctx.amax(dim=(2, 3)))
    out = torch.matmul(probs, values.float()[:, :, None])  # (B, Hkv, G, Q, D)
    out = out.reshape(batch, n_heads, n_q, head_dim).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """The replay attention builds its own mask."""
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(REPLAY_ATTENTION, _replay_attention)
    AttentionMaskInterface.register(REPLAY_ATTENTION, _no_mask)


def repeat_sequence(context_ids: torch.Tensor, n_pad: list[int], prompt_ids: tuple[int, ...],
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The left-padded repeat sequence of every row, [pad]*n_pad[b] + prompt + row b's real context ids, its (B, R)
    validity and its positions (row b's real tokens continue after its T - n_pad[b] context positions)."""
    batch, n_ctx = context_ids.shape
    device = context_ids.device
    prompt = torch.tensor(prompt_ids, dtype=context_ids.dtype, device=device)
    rows, valid, positions = [], [], []
    length = len(prompt_ids) + n_ctx
    for b in range(batch):
        pad = n_pad[b]
        real = context_ids[b, pad:]
        rows.append(torch.cat([torch.full((pad,), pad_id, dtype=context_ids.dtype, device=device), prompt, real]))
        v = torch.arange(length, device=device) >= pad
        valid.append(v)
        positions.append(torch.where(v, torch.arange(length, device=device) - pad + (n_ctx - pad), 0))
    return torch.stack(rows), torch.stack(valid), torch.stack(positions)


@torch.inference_mode()
def replay_scores(model, contexts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scored: set[int],
                  context_ids: torch.Tensor, n_pad: list[int], prompt_ids: tuple[int, ...],
                  chunk_size: int) -> dict[int, torch.Tensor]:
    """Per scored layer index: (B, Hkv, T) max attention each stored context token receives while `model`
    reconstructs the context (`contexts[i]` = layer i's stored K, V, valid). The model's attention implementation
    is restored afterwards, also on error."""
    _register()
    layers = {}
    for index, (keys, values, valid) in contexts.items():
        scores = None
        if index in scored:
            scores = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
        layers[index] = _LayerReplay(keys, values, valid, scores)
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    ids, rep_valid, positions = repeat_sequence(context_ids, n_pad, prompt_ids, pad_id)
    replay = _Replay(layers, rep_valid)
    base = getattr(model, model.base_model_prefix, model)  # hidden states only: no vocabulary logits
    previous = model.config._attn_implementation
    model.set_attn_implementation(REPLAY_ATTENTION)
    _ACTIVE.replay = replay
    try:
        for start in range(0, ids.shape[1], chunk_size):
            replay.start = start
            stop = start + chunk_size
            base(input_ids=ids[:, start:stop], position_ids=positions[:, start:stop], use_cache=False)
    finally:
        _ACTIVE.replay = None
        model.set_attn_implementation(previous)
    return {index: layer.scores for index, layer in layers.items() if layer.scores is not None}
