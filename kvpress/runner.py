"""Run one compressed generation with progress and timing: the engine behind the CLI and the demo."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .cache import KVPressCache
from .config import resolve_config
from .hf_compat import cache_kwargs


@dataclass
class GenerationReport:
    """What one generation produced and cost (bytes from the cache's real tensors)."""

    answer: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float  # every decode step, the first included
    stats: dict[str, Any] = field(default_factory=dict)
    first_step_s: float | None = None  # the first decode step alone (a press compresses the prompt there)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps after the first (all of them when the first is not timed apart)."""
        steps, seconds = self.new_tokens - 1, self.decode_s
        if self.first_step_s is not None and steps > 1:
            steps, seconds = steps - 1, seconds - self.first_step_s
        return steps / seconds if seconds > 0 and steps > 0 else 0.0

    def summary(self) -> str:
        s = self.stats
        mib = 1 << 20
        first = "" if self.first_step_s is None else f"first step {1000 * self.first_step_s:.0f} ms, then "
        return (
            f"KV {s['nbytes'] / mib:.2f} MiB vs {s['fp16_nbytes'] / mib:.2f} MiB fp16 ({100 * s['compression']:.0f}%) | "
            f"stored {s['stored_tokens']:.0f}/{s['logical_tokens']} tokens | prefill {self.prefill_s:.2f} s "
            f"({self.prompt_tokens} tokens) | decode: {first}{self.decode_tokens_per_s:.1f} tok/s"
        )


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> dict[str, torch.Tensor]:
    """Tokenise, through the chat template when the tokenizer has one (instruct models)."""
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    return tokenizer(prompt, return_tensors="pt")


class _ForwardClock:
    """Counts prompt tokens through the embedding layer (progress bar) and stamps when the first and the second
    decode steps start."""

    def __init__(self, model, prompt_tokens: int, show: bool) -> None:
        self.prompt_tokens = prompt_tokens
        self.seen = 0
        self.decode_start: float | None = None
        self.second_step_start: float | None = None
        self.bar = tqdm(total=prompt_tokens, desc="prefill", unit="tok", disable=not show, leave=False)
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        n = args[0].shape[-1]
        if self.seen < self.prompt_tokens:
            self.seen += n
            self.bar.update(n)
        elif self.decode_start is None:
            self.decode_start = time.perf_counter()
        elif self.second_step_start is None:
            self.second_step_start = time.perf_counter()

    def close(self) -> None:
        self.handle.remove()
        self.bar.close()


@torch.inference_mode()
def generate_with_report(
    model,
    tokenizer,
    prompt: str,
    press: Any = None,
    quant: Any = None,
    max_new_tokens: int = 64,
    prefill_chunk_size: int | None = None,
    show_progress: bool = True,
) -> GenerationReport:
    """Greedy generation through a fresh KVPressCache; returns the answer, timings and memory stats.
    `prefill_chunk_size`: None prefills the prompt in one forward, the fastest on the CPU (3k tokens: 1024-token
    chunks cost 14-17% more, eval/results/bench_cpu_prefill_chunks.json); chunks bound activation memory."""
    cfg = resolve_config(press=press, quant=quant)
    inputs = encode_prompt(tokenizer, prompt).to(model.device)
    n_prompt = inputs["input_ids"].shape[1]
    cache = KVPressCache(model.config, press=cfg.press, quant=cfg.quant)
    clock = _ForwardClock(model, n_prompt, show_progress)
    start = time.perf_counter()
    try:
        out = model.generate(
            **inputs, **cache_kwargs(model, cache), max_new_tokens=max_new_tokens, do_sample=False,
            prefill_chunk_size=prefill_chunk_size if prefill_chunk_size and n_prompt > prefill_chunk_size else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    finally:
        clock.close()
    end = time.perf_counter()
    decode_start = clock.decode_start or end
    new = out[0, n_prompt:]
    return GenerationReport(
        answer=tokenizer.decode(new, skip_special_tokens=True).strip(),
        prompt_tokens=n_prompt,
        new_tokens=int(new.shape[0]),
        prefill_s=decode_start - start,
        decode_s=end - decode_start,
        stats=cache.stats(),
        first_step_s=None if clock.second_step_start is None else clock.second_step_start - decode_start,
    )
