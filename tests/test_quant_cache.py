"""Quantized KV inside the cache: bytes per token, tokens quantized once, closeness to full precision."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import kvpress
from kvpress.quant import QuantSpec
from kvpress.hf_compat import cache_kwargs
from tiny_models import left_padded_batch, tiny_model


def _model_head_dim(head_dim: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=2 * head_dim, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, pad_token_id=0)
    return kvpress.wrap(AutoModelForCausalLM.from_config(config).eval())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("spec", ["int8-int4:r0:s0", "int8-int4:g32:r0:s0", "int8:r0:s0", "int4:gnone:r0:s0"])
def test_bytes_per_token_match_the_formula(head_dim, spec):
    model = _model_head_dim(head_dim)
    cache = kvpress.KVPressCache(model.config, quant=spec)
    ids, mask = left_padded_batch(batch=1, length=50, pads=(0,))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    per_token = cache.stats()["nbytes"] / (2 * 1 * 50)  # layers x kv heads x tokens
    expected = QuantSpec.parse(spec).bytes_per_token_head(head_dim)
    assert abs(per_token - expected) <= 0.03 * expected


def test_tokens_are_quantized_once():
    model = kvpress.wrap(tiny_model("llama"))
    cache = kvpress.KVPressCache(model.config, quant="int8-int4:g8:r4:s2")
    ids, mask = left_padded_batch(batch=2, length=30, pads=(0, 5))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
        main = cache.layers[0].kv.main
        codes_before = {k: v.clone() for k, v in main.views().items()}
        model.generate(input_ids=torch.cat([ids, ids[:, :1]], 1), attention_mask=torch.cat([mask, mask[:, :1]], 1),
                       past_key_values=cache, max_new_tokens=40, do_sample=False, pad_token_id=0)
    n = codes_before["k"].shape[2]
    assert main.length > n  # the window flushed new tokens into the quantized middle
    for name, before in codes_before.items():
        assert torch.equal(main.views()[name][:, :, :n], before)


def _teacher_forced_logprobs(model, ids, mask, cache, n_forced):
    with torch.no_grad():
        out = model(input_ids=ids[:, :-n_forced], attention_mask=mask[:, :-n_forced], **cache_kwargs(model, cache))
        logits = [out.logits[:, -1]]
        for t in range(ids.shape[1] - n_forced, ids.shape[1] - 1):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(model, cache))
            logits.append(out.logits[:, -1])
    return torch.log_softmax(torch.stack(logits, 1).float(), -1)


@pytest.mark.parametrize("spec", ["int8-int4:g8:r4:s2", "int8:g8:r0:s0"])
def test_quantized_decoding_stays_close_to_full_precision(spec):
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=2, length=48, pads=(0, 7))
    ref = _teacher_forced_logprobs(model, ids, mask, kvpress.KVPressCache(model.config), 24)
    got = _teacher_forced_logprobs(model, ids, mask, kvpress.KVPressCache(model.config, quant=spec), 24)
    kl = (ref.exp() * (ref - got)).sum(-1)
    assert kl.mean() < 1e-3
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_press_and_quant_combine():
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=2, length=60, pads=(0, 7))
    sizes = {}
    for name, press, quant in [("full", None, None), ("press", "knorm:0.5", None),
                               ("quant", None, "int8-int4:g8:r4:s2"), ("both", "knorm:0.5", "int8-int4:g8:r4:s2")]:
        cache = kvpress.KVPressCache(model.config, press=press, quant=quant)
        model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5, do_sample=False,
                       pad_token_id=0)
        sizes[name] = cache.stats()["nbytes"]
    assert sizes["both"] < sizes["quant"] < sizes["full"]
    assert sizes["both"] < sizes["press"] < sizes["full"]


@pytest.mark.parametrize("chunk", [None, 4])
def test_left_padded_rows_keep_their_first_tokens_in_full_precision(chunk):
    """The fp sinks of a left-padded batch are widened by its padding (also when padding spans several prefill
    chunks): every row's first n_sink real tokens are stored exactly as in its batch-1 run, never quantized."""
    model = kvpress.wrap(tiny_model("llama"))
    ids, mask = left_padded_batch(batch=2, length=20, pads=(0, 6))
    batched = kvpress.KVPressCache(model.config, quant="int8-int4:g8:r4:s2")
    single = kvpress.KVPressCache(model.config, quant="int8-int4:g8:r4:s2")
    with torch.no_grad():
        for lo in range(0, 20, chunk or 20):
            hi = lo + (chunk or 20)
            model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], **cache_kwargs(model, batched),
                  position_ids=(mask[:, :hi].cumsum(-1) - 1).clamp(min=0)[:, lo:hi])
        model(input_ids=ids[1:, 6:], **cache_kwargs(model, single))
    for layer_b, layer_s in zip(batched.layers, single.layers):
        assert layer_b.kv.sink.length == 2 + 6 and layer_s.kv.sink.length == 2
        for name in ("k", "v"):
            assert torch.equal(layer_b.kv.sink.store.view(name)[1, :, 6:], layer_s.kv.sink.store.view(name)[0])
