"""transformers pipeline integration.

- A wrapped model works in the standard `pipeline("text-generation", model=model, tokenizer=tok)`; a per-call
  `pipe(prompt, press="snapkv:0.5", quant="int8-int4")` reaches the wrapped `generate` as keyword arguments.
- `pipeline("kv-press-text-generation", model=model, tokenizer=tok)`: `pipe(context, question=...)` or
  `questions=[...]` prefills and compresses the context ONCE (the questions are not seen during compression) and
  answers every question from a copy of that compressed cache, without prefilling the context again.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .api import is_wrapped, wrap
from .cache import KVPressCache
from .config import resolve_config
from .hf_compat import cache_kwargs

TASK_NAME = "kv-press-text-generation"
_MARKER = "\u2063KVPRESS-QUESTION\u2063"


class KVPressTextGenerationPipeline(Pipeline):
    """Answer one or many questions about a long context that is prefilled and compressed only once."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, question=None, questions=None, press=None, quant=None, max_new_tokens=64,
                             **generate_kwargs):
        if question is not None and questions is not None:
            raise ValueError("Pass either question= or questions=[...], not both.")
        qs = [question] if question is not None else list(questions or [])
        cfg = resolve_config(press=press, quant=quant)  # validated before any work
        preprocess = {"questions": qs} if qs else {}
        return preprocess, {"config": cfg, "max_new_tokens": max_new_tokens, **generate_kwargs}, {}

    def preprocess(self, context: str, questions: list[str] | None = None) -> dict[str, Any]:
        """Token ids of the context part of the prompt and of each question part (chat template aware)."""
        if not questions:
            raise ValueError("kv-press-text-generation needs question='...' or questions=[...] with the context.")
        context_ids, tails = split_prompt(self.tokenizer, context, questions)
        return {"context_ids": context_ids, "question_ids": tails, "questions": questions}

    def _forward(self, inputs: dict[str, Any], config, max_new_tokens: int, **generate_kwargs) -> dict[str, Any]:
        if not is_wrapped(self.model):
            wrap(self.model)
        device = self.model.device
        context_ids = inputs["context_ids"].to(device)
        cache = compressed_context(self.model, context_ids, press=config.press, quant=config.quant)
        answers = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for tail in inputs["question_ids"]:
            ids = torch.cat([context_ids, tail.to(device)], dim=1)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      **cache_kwargs(self.model, copy.deepcopy(cache)), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=pad, **generate_kwargs)
            answers.append(out[0, ids.shape[1]:])
        return {"answers": answers, "questions": inputs["questions"], "stats": cache.stats()}

    def postprocess(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"question": q, "answer": self.tokenizer.decode(a, skip_special_tokens=True).strip(), "kv": outputs["stats"]}
            for q, a in zip(outputs["questions"], outputs["answers"])
        ]


@torch.inference_mode()
def compressed_context(model, context_ids: torch.Tensor, press: Any = None, quant: Any = None,
                       prefill_chunk_size: int | None = None) -> KVPressCache:
    """Prefill `context_ids` (B, T) into a fresh KVPressCache and compress it before any question is seen (the
    query-agnostic protocol); `model` must be wrapped. A press that replays the context (KVzip) reads the recorded
    ids. `prefill_chunk_size`: prefill in chunks of that many tokens (None: one forward)."""
    cache = KVPressCache(model.config, press=press, quant=quant)
    cache.record_prompt_ids(context_ids)
    cache.expect_prompt(context_ids.shape[1])  # a 1-token last chunk is still prompt
    step = prefill_chunk_size or context_ids.shape[1]
    for start in range(0, context_ids.shape[1], step):
        model(input_ids=context_ids[:, start:start + step], **cache_kwargs(model, cache), use_cache=True)
    cache.compress(model=model)
    return cache


def split_prompt(tokenizer, context: str, questions: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(context ids (1, Tc), [question ids (1, Tq)]): the context prefix of the chat prompt is shared by all
    questions, each question id list holds the question and the rest of the template (generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{context}\n\n{_MARKER}"}],
                                             add_generation_prompt=True, tokenize=False)
        prefix, suffix = text.split(_MARKER)
    else:
        prefix, suffix = f"{context}\n\n", "\n"
    context_ids = tokenizer(prefix, return_tensors="pt", add_special_tokens=False).input_ids
    tails = [tokenizer(f"{q}{suffix}", return_tensors="pt", add_special_tokens=False).input_ids for q in questions]
    return context_ids, tails


def register_pipeline() -> None:
    """Register "kv-press-text-generation" with transformers' pipeline registry (idempotent)."""
    if TASK_NAME not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK_NAME, pipeline_class=KVPressTextGenerationPipeline,
                                            pt_model=AutoModelForCausalLM)
