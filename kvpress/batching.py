"""generate_many: many prompts through a (wrapped) model in batches ordered by shared prefix, so that later batches
hit the prefix cache; outputs come back in the caller's order."""
from __future__ import annotations

import torch


def generate_many(model, prompts: list, tokenizer=None, batch_size: int = 8, **generate_kwargs) -> list:
    """Generate for many prompts, batched in depth-first order of their shared prefixes (lexicographic order of the
    token ids: prompts sharing the longest prefixes run next to each other, so later batches hit the prefix cache).
    Returns the new tokens per prompt (decoded strings when a tokenizer is given) in the caller's order; with
    num_return_sequences=n > 1, a list of the prompt's n sequences (in generate's order) per prompt."""
    if not prompts:
        return []
    if tokenizer is not None and isinstance(prompts[0], str):
        token_lists = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    else:
        token_lists = [list(p) for p in prompts]
    pad_id = generate_kwargs.pop("pad_token_id", None)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    config = generate_kwargs.get("generation_config") or model.generation_config
    returned = generate_kwargs.get("num_return_sequences", config.num_return_sequences) or 1
    order = sorted(range(len(token_lists)), key=lambda i: token_lists[i])
    results: list = [None] * len(token_lists)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(token_lists[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            n = len(token_lists[i])
            ids[row, width - n :] = torch.tensor(token_lists[i])
            mask[row, width - n :] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             pad_token_id=pad_id, **generate_kwargs)
        out = out.sequences if hasattr(out, "sequences") else out
        per_prompt = out.shape[0] // len(idx)  # generate returns num_return_sequences rows per input row, in order
        for row, i in enumerate(idx):
            seqs = [out[row * per_prompt + j, width:].tolist() for j in range(per_prompt)]
            if tokenizer is not None:
                seqs = [tokenizer.decode(new, skip_special_tokens=True) for new in seqs]
            results[i] = seqs if returned > 1 else seqs[0]
    return results
