"""lm-eval model type "kvpress": lm-eval's Hugging Face model (HFLM) whose generate calls compress the KV cache.

Use it as ``--model kvpress --model_args pretrained=PATH|default,press=snapkv:0.5,quant=int8-int4`` (through
``kvpress-lm-eval`` / ``python -m kvpress.eval.launcher``, which registers it). ``pretrained=default`` is the
embedded SmolLM2-135M-Instruct. ``press``, ``quant``, ``paged`` and ``compress_loglikelihood`` are validated before
the model is loaded; every other key (``dtype=``, ``device=``, ``parallelize=True``, ``load_in_4bit=True`` ...) goes
to HFLM unchanged, so built-in behaviour (batching, chat templates, accelerate data parallelism) stays.

What is compressed: every ``generate_until`` request runs ``model.generate`` with a fresh KVPressCache (the prompt
is compressed before the first decoded token). ``loglikelihood`` requests are NOT affected by default: HFLM scores
them with one plain forward pass, which has no cache to compress. With ``compress_loglikelihood=true`` each
context is prefilled into a KVPressCache, compressed (``cache.compress()``), and the continuation tokens are scored
against the compressed cache (one request at a time, whatever the batch size).

lm-eval splits ``--model_args`` at commas: quote a press spec that has options,
``press='h2o:0.5:max_tokens=512,recent=64'`` (a stray press field such as ``recent=64`` is rejected).
The stats of every cache (``KVPressCache.stats()``) are summed into ``cache_summary()``; lm-eval writes that summary
into its results file under ``config.kvpress`` (per process; rank 0's under accelerate data parallelism).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

import kvpress
from kvpress.api import wrapped_config
from kvpress.cache import KVPressCache
from kvpress.config import KVConfig, parse_bool, resolve_config
from kvpress.default_model import default_model_path
from kvpress.hf_compat import cache_kwargs, pop_cache
from kvpress.presses.registry import PRESSES

MODEL_NAME = "kvpress"
_PRESS_FIELDS = frozenset(f.name for cls in PRESSES.values() for f in dataclasses.fields(cls))


def validate_model_args(press: Any, quant: Any, paged: Any, extra: dict[str, Any]) -> KVConfig:
    """Parse the compression options (ValueError naming the bad one) and reject press fields split off by commas."""
    stray = sorted(_PRESS_FIELDS & extra.keys())
    if stray:
        raise ValueError(
            f"kvpress model_args got {stray}, which are press fields, not model arguments: lm-eval splits "
            "--model_args at commas, so quote a press spec with options, e.g. "
            "press='h2o:0.5:max_tokens=512,recent=64'."
        )
    try:
        return resolve_config(press=press, quant=quant, paged=paged)
    except ValueError as err:
        raise ValueError(f"kvpress model_args: {err}") from None


def resolve_pretrained(pretrained: Any) -> Any:
    """'default' (or empty) is the embedded default model's local checkpoint; anything else is passed through."""
    if pretrained is None or (isinstance(pretrained, str) and pretrained.strip().lower() in ("", "default")):
        return str(default_model_path())
    return pretrained


@register_model(MODEL_NAME)
class KVPressLM(HFLM):
    """HFLM with a kvpress-wrapped model: each generate call builds a fresh compressing KVPressCache."""

    def __init__(self, pretrained: Any = "default", press: Any = None, quant: Any = None, paged: Any = False,
                 compress_loglikelihood: Any = False, **kwargs: Any) -> None:
        """Validate the compression options, load the model through HFLM, then `kvpress.wrap` it."""
        self.kv_config = validate_model_args(press, quant, paged, kwargs)
        self.compress_loglikelihood = parse_bool(compress_loglikelihood, "compress_loglikelihood")
        super().__init__(pretrained=resolve_pretrained(pretrained), **kwargs)
        if self.backend != "causal":
            raise ValueError("the kvpress model type needs a decoder-only (causal) model; got a seq2seq backend.")
        cfg = self.kv_config
        kvpress.wrap(self.model, press=cfg.press, quant=cfg.quant, paged=cfg.paged)
        self.last_cache_stats: dict[str, Any] | None = None
        self._totals = {"caches": 0, "logical_tokens": 0.0, "stored_tokens": 0.0, "nbytes": 0, "fp16_nbytes": 0}

    # --- caches -------------------------------------------------------------------------------------------------
    def new_cache(self) -> KVPressCache:
        """A fresh cache with the configuration the model was wrapped with."""
        cfg = wrapped_config(self.model) or self.kv_config
        return KVPressCache(self.model.config, press=cfg.press, quant=cfg.quant, paged=cfg.paged)

    def _record(self, cache: KVPressCache) -> None:
        """Keep the cache's stats (last one, and running totals weighted by batch size)."""
        stats = cache.stats()
        self.last_cache_stats = stats
        rows = max(stats["batch_size"], 1)
        totals = self._totals
        totals["caches"] += 1
        totals["logical_tokens"] += stats["logical_tokens"] * rows
        totals["stored_tokens"] += stats["stored_tokens"] * rows
        totals["nbytes"] += stats["nbytes"]
        totals["fp16_nbytes"] += stats["fp16_nbytes"]

    def cache_summary(self) -> dict[str, Any]:
        """Totals over every cache this model built: kept_fraction = stored / logical tokens (1.0 = nothing
        evicted), compression = bytes held / bytes of a 16-bit cache of the same tokens."""
        totals = dict(self._totals)
        logical, fp16 = totals["logical_tokens"], totals["fp16_nbytes"]
        cfg = self.kv_config
        return {
            "press": repr(cfg.press) if cfg.press is not None else None,
            "quant": str(cfg.quant) if cfg.quant is not None else None,
            "compress_loglikelihood": self.compress_loglikelihood,
            **totals,
            "kept_fraction": totals["stored_tokens"] / logical if logical else None,
            "compression": totals["nbytes"] / fp16 if fp16 else None,
        }

    def get_model_info(self) -> dict:
        """HFLM's model info plus the cache summary (lm-eval stores it in results['config'])."""
        return {**super().get_model_info(), MODEL_NAME: self.cache_summary()}

    # --- generation ---------------------------------------------------------------------------------------------
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """HFLM's generate with a fresh KVPressCache whose stats are recorded afterwards."""
        cache = pop_cache(generation_kwargs)  # either name; passed on under the installed transformers' name
        if cache is None:
            cache = self.new_cache()
        generation_kwargs.update(cache_kwargs(self.model, cache))
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        if isinstance(cache, KVPressCache):
            self._record(cache)
        return out

    # --- loglikelihood ------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's scoring, or with compress_loglikelihood=true: score each continuation on a compressed cache."""
        if not self.compress_loglikelihood:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        results = []
        for request_str, context_enc, continuation_enc in tqdm(
            requests, disable=disable_tqdm or self.rank != 0, desc="Running compressed loglikelihood requests"
        ):
            answer = self.score_compressed(context_enc, continuation_enc)
            results.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def score_compressed(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        """(log-probability of the continuation, whether it is the greedy one) after compressing the context.

        Same token window as HFLM (left-truncated to max_length); all but the last context token are prefilled and
        compressed, then [last context token, continuation[:-1]] is run over the compressed cache.
        """
        if not context_enc or not continuation_enc:
            raise ValueError("loglikelihood requests need a non-empty context and continuation")
        tokens = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
        n_cont = min(len(continuation_enc), len(tokens) - 1)
        inputs = torch.tensor([tokens[:-1]], dtype=torch.long, device=self.device)
        split = inputs.shape[1] - n_cont
        target = torch.tensor(tokens[-n_cont:], dtype=torch.long, device=self.device)
        cache = self.new_cache()
        autocast = torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                  enabled=self.mixed_precision_dtype is not None)
        with torch.no_grad(), autocast:
            if split > 0:
                self.model(input_ids=inputs[:, :split], **cache_kwargs(self.model, cache), use_cache=True)
                cache.compress()
            logits = self.model(input_ids=inputs[:, split:], **cache_kwargs(self.model, cache), use_cache=True).logits
        self._record(cache)
        logprobs = F.log_softmax(logits[0], dim=-1, dtype=self.softmax_dtype)
        greedy = bool((logprobs.argmax(dim=-1) == target).all())
        return float(logprobs.gather(-1, target[:, None]).sum()), greedy
