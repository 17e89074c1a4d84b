"""Deferred encoding (prefix sharing with compression): a layer holds its prompt in full precision until the prompt's
last token has been attended, then rebuilds the whole prompt (shared prefix pages + private tokens) to store it
compressed exactly as a one-chunk prefill would (KVPressLayer.defer_encoding, then finish_forward)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .kernels.store_access import gather_tokens


@dataclass
class DeferredEncoding:
    """Press and quantization a layer applies once the prompt's last token has been attended in full precision;
    `state` is the press's state holding what the rows' prompts showed it before that token (None: a fresh one)."""

    press: Any
    quant: Any
    state: Any = None  # PressState (kvpress/presses/state.py)
    shared: Any = None  # SharedPrefix of quantized codes standing in for stored slots shared_slots[0]:shared_slots[1]
    shared_slots: tuple[int, int] = (0, 0)


def full_prompt(prefix, store, kv_start: torch.Tensor | None):
    """(k, v, valid) of every row's whole prompt in full precision, left-padded: its shared prefix tokens
    [0, prefix.ends[b]) gathered from the pages, then its private tokens [kv_start[b], store.length)."""
    private_k, private_v = store.view("k"), store.view("v")
    batch = private_k.shape[0]
    starts = kv_start.tolist() if kv_start is not None else [0] * batch
    ends = prefix.ends.tolist() if prefix is not None else [0] * batch
    rows = []
    for b in range(batch):
        row = {"k": private_k[b, :, starts[b]:], "v": private_v[b, :, starts[b]:]}
        if ends[b]:
            table = prefix.block_table[b : b + 1]
            row = {name: torch.cat([gather_tokens(prefix.fields[name], table, 0, ends[b], contiguous=False)[0]
                                    .to(row[name].dtype), row[name]], dim=1) for name in row}
        rows.append(row)
    width = max(r["k"].shape[1] for r in rows)
    k, v = (torch.stack([torch.nn.functional.pad(r[name], (0, 0, width - r[name].shape[1], 0)) for r in rows])
            for name in ("k", "v"))
    lengths = torch.tensor([r["k"].shape[1] for r in rows], device=k.device)
    valid = torch.arange(width, device=k.device)[None, :] >= (width - lengths)[:, None]
    return k, v, valid
