"""Deferred encoding (prefix sharing with compression): a layer holds its prompt in full precision until the prompt's
last token has been attended, then rebuilds the whole prompt (shared prefix pages + private tokens) to store it
compressed exactly as a one-chunk prefill would (KVPressLayer.encode_deferred)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DeferredEncoding:
    """Press and quantization a layer applies once the prompt's last token has been attended in full precision;
    `window_queries` are the prompt queries the press observed before that token (SnapKV), or None."""

    press: Any
    quant: Any
    window_queries: torch.Tensor | None = None
    shared: Any = None  # SharedPrefix of quantized codes standing in for stored slots shared_slots[0]:shared_slots[1]
    shared_slots: tuple[int, int] = (0, 0)


def full_prompt(prefix, store, kv_start: torch.Tensor | None):
    """(k, v, valid) of every row's whole prompt in full precision, left-padded: its shared prefix tokens
    [0, prefix.ends[b]) gathered from the pages, then its private tokens [kv_start[b], store.length)."""
    private_k, private_v = store.view("k"), store.view("v")
    batch, heads, n_private, _ = private_k.shape
    starts = kv_start.tolist() if kv_start is not None else [0] * batch
    ends = prefix.ends.tolist() if prefix is not None else [0] * batch
    rows = []
    for b in range(batch):
        row = {"k": private_k[b, :, starts[b]:], "v": private_v[b, :, starts[b]:]}
        if ends[b]:
            pages = prefix.block_table[b, : -(-ends[b] // prefix.fields["k"].shape[2])].long()
            shared = {name: prefix.fields[name][pages].transpose(0, 1).flatten(1, 2)[:, : ends[b]] for name in row}
            row = {name: torch.cat([shared[name].to(row[name].dtype), row[name]], dim=1) for name in row}
        rows.append(row)
    width = max(r["k"].shape[1] for r in rows)
    k, v = (torch.stack([torch.nn.functional.pad(r[name], (0, 0, width - r[name].shape[1], 0)) for r in rows])
            for name in ("k", "v"))
    lengths = torch.tensor([r["k"].shape[1] for r in rows], device=k.device)
    valid = torch.arange(width, device=k.device)[None, :] >= (width - lengths)[:, None]
    return k, v, valid
