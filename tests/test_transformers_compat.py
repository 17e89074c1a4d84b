"""transformers 5.x: kvpress passes its cache under the name the installed version takes (`cache` from 5.24,
`past_key_values` before), so its own calls never trigger the deprecation warning; callers may use either name.
Also part of the compat job (`make test-compat`: the oldest transformers pyproject allows)."""
import contextlib
import inspect
import logging
import warnings

import pytest
import torch

import kvpress
from kvpress.hf_compat import cache_kwarg, pop_cache
from tiny_models import tiny_model

GEN = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
DEPRECATED = "past_key_values"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def no_cache_name_deprecation():
    """Fail on a `past_key_values` deprecation, whether warnings.warn'ed (FutureWarning / DeprecationWarning) or
    logged by transformers' logger (its warning_once memo is cleared first so earlier tests cannot hide it)."""
    records = _Records()
    logger = logging.getLogger("transformers")
    memo = getattr(logging.Logger.warning_once, "cache_clear", None)  # transformers' lru_cache'd warning_once
    if memo is not None:
        memo()
    logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=f".*{DEPRECATED}.*", category=FutureWarning)
            warnings.filterwarnings("error", message=f".*{DEPRECATED}.*", category=DeprecationWarning)
            yield
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if DEPRECATED in m], records.messages


def _prompts():
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(3, 128, (40,), generator=g).tolist()
    return [doc + torch.randint(3, 128, (n,), generator=g).tolist() for n in (6, 6, 6)]


def test_cache_name_follows_the_installed_forward():
    model = tiny_model("llama")
    params = inspect.signature(type(model).forward).parameters
    assert cache_kwarg(model) == ("cache" if "cache" in params else "past_key_values")
    assert pop_cache({"past_key_values": 1}) == 1 and pop_cache({"cache": 2}) == 2 and pop_cache({}) is None
    with pytest.raises(ValueError, match="not both"):
        pop_cache({"cache": 1, "past_key_values": 2})


def test_kvpress_calls_do_not_use_the_deprecated_name():
    model = tiny_model("llama")
    ids = torch.tensor(_prompts())
    plain = model.generate(input_ids=ids, **GEN)
    kvpress.wrap(model, press="knorm:0.5")
    try:
        with no_cache_name_deprecation():
            compressed = model.generate(input_ids=ids, **GEN)  # the cache wrap builds
            kvpress.generate_many(model, _prompts(), batch_size=2, **GEN)
        kvpress.wrap(model)
        with no_cache_name_deprecation():
            assert torch.equal(model.generate(input_ids=ids, **GEN), plain)
            # a caller's cache under either name still works (and kvpress passes it on under the installed name)
            for name in ("past_key_values", "cache"):
                cache = kvpress.KVPressCache(model.config, press="knorm:0.5")
                assert torch.equal(model.generate(input_ids=ids, **{name: cache}, **GEN), compressed)
                assert cache.get_seq_length() > 0
        prefix_cache = kvpress.PrefixCache(max_tokens=1024)
        kvpress.wrap(model, paged=True, prefix_cache=prefix_cache)
        with no_cache_name_deprecation():  # the second call prefills only the private tokens of each row
            assert torch.equal(model.generate(input_ids=ids, **GEN), plain)
            assert torch.equal(model.generate(input_ids=ids, **GEN), plain)
        assert kvpress.last_generate_stats(model)["matched_tokens"] == [32, 32, 32]
    finally:
        kvpress.unwrap(model)


def test_no_future_warning_from_wrapped_generate_or_a_forward_through_the_helper():
    """Every FutureWarning is an error here (not only the cache name's): a wrapped generate (its own cache, and a
    caller's under either name) and forwards that pass a cache through hf_compat.cache_kwargs, as the tests and
    eval/ do."""
    from transformers import DynamicCache

    from kvpress.hf_compat import cache_kwargs

    model = tiny_model("llama")
    ids = torch.tensor(_prompts())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        plain = model(input_ids=ids, **cache_kwargs(model, DynamicCache(config=model.config))).logits
        kvpress.wrap(model, quant="int8-int4:r4:s2")
        try:
            out = model.generate(input_ids=ids, **GEN)
            for name in ("past_key_values", "cache"):
                cache = kvpress.KVPressCache(model.config, quant="int8-int4:r4:s2")
                assert torch.equal(model.generate(input_ids=ids, **{name: cache}, **GEN), out)
            cache = kvpress.KVPressCache(model.config)
            with torch.no_grad():
                logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits
                step = model(input_ids=ids[:, -1:], **cache_kwargs(model, cache), use_cache=True).logits
        finally:
            kvpress.unwrap(model)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1] + 1 and step.shape[1] == 1
