"""Per-layer budgets (`layers=pyramid`) and decode-time re-scoring (`max_tokens=..., every=K`) for any scorer."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import kvpress
from kvpress.presses import KnormPress, SnapKVPress
from kvpress.presses.layer_budgets import pyramid_shares
from kvpress.presses.registry import parse_press
from kvpress.hf_compat import cache_kwargs
from tiny_models import left_padded_batch, tiny_configs, tiny_model

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def deep_model(n_layers: int = 6):
    """The tiny llama with more layers, so that a per-layer schedule has room to show."""
    torch.manual_seed(0)
    config = tiny_configs()["llama"]
    config.num_hidden_layers = n_layers
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("spec", ["knorm:0.5", "snapkv:0.75:window_size=8", "h2o:0.3:n_sink=4,recent=8",
                                  "knorm:0.1", "expected:0.9", "knorm:0.5:max_tokens=40"])
@pytest.mark.parametrize("n_layers", [2, 6, 32])
@pytest.mark.parametrize("n_tokens", [20, 101, 1000])
def test_pyramid_budgets_keep_the_uniform_total_and_decrease_with_depth(spec, n_layers, n_tokens):
    uniform = parse_press(spec)
    pyramid = parse_press(spec + (",layers=pyramid" if spec.count(":") == 2 else ":layers=pyramid"))
    budgets = [pyramid.layer_budget(n_tokens, i, n_layers) for i in range(n_layers)]
    assert sum(budgets) == n_layers * uniform.n_keep(n_tokens)  # the same total (exact after rounding)
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # lower layers keep more
    forced = min(n_tokens, pyramid.n_sink + pyramid.recent)
    assert all(forced <= b <= n_tokens for b in budgets)
    assert [uniform.layer_budget(n_tokens, i, n_layers) for i in range(n_layers)] == [uniform.n_keep(n_tokens)] * n_layers


def test_pyramid_is_linear_as_in_pyramidkv():
    press = KnormPress(compression_ratio=0.5, layers="pyramid")
    budgets = [press.layer_budget(1000, i, 5) for i in range(5)]
    steps = {a - b for a, b in zip(budgets, budgets[1:])}
    assert max(steps) - min(steps) <= 1 and budgets[0] > 1.9 * 500 and budgets[-1] < 500 / 10
    assert pyramid_shares(10, 3, cap=4) == [4, 4, 2]  # capped layers give their excess to the others
    assert sum(pyramid_shares(7, 4, cap=100)) == 7


def test_stored_tokens_per_layer_follow_the_schedule():
    model = kvpress.wrap(deep_model(6))
    ids, mask = left_padded_batch(batch=1, length=60, pads=(0,))
    press = SnapKVPress(compression_ratio=0.5, window_size=4, kernel_size=3, layers="pyramid")
    cache = kvpress.KVPressCache(model.config, press=press)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model, cache))
    cache.compress()
    stored = cache.stats()["stored_tokens_per_layer"]
    assert stored == [press.layer_budget(60, i, 6) for i in range(6)]
    assert sum(stored) == 6 * 30 and stored[0] > stored[-1]


def test_pyramid_batched_rows_equal_their_batch_1_runs():
    model = kvpress.wrap(deep_model(4), press="knorm:0.5:layers=pyramid")
    ids, mask = left_padded_batch(batch=2, length=30, pads=(0, 7))
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **GEN)
    for row in range(2):
        real = mask[row].bool()
        alone = model.generate(input_ids=ids[row:row + 1, real], attention_mask=mask[row:row + 1, real],
                               max_new_tokens=6, **GEN)
        assert torch.equal(alone[0, -6:], batched[row, -6:])


def _generate_recording(model, press, quant=None, length=40, pads=(0,), new=30):
    """Generate with a fresh cache; return the output, the stored tokens per layer seen at every forward's start
    and at the end, and the cache."""
    ids, mask = left_padded_batch(batch=len(pads), length=length, pads=pads)
    cache = kvpress.KVPressCache(model.config, press=press, quant=quant)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda *a: seen.append(cache.stats()["stored_tokens_per_layer"]))
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, **GEN)
    finally:
        hook.remove()
    seen.append(cache.stats()["stored_tokens_per_layer"])
    return out, seen, cache


@pytest.mark.parametrize("spec", ["snapkv:0.5:window_size=4,kernel_size=3", "tova:0.5", "knorm:0.5", "expected:0.5",
                                  "h2o:0.5:recent=4", "streaming:0.5", "random:0.5"])
def test_decode_time_rescoring_bounds_every_layer(spec):
    max_tokens, every = 16, 5
    press = parse_press(f"{spec},max_tokens={max_tokens},every={every}" if spec.count(":") == 2
                        else f"{spec}:max_tokens={max_tokens},every={every}")
    model = kvpress.wrap(tiny_model("llama"))
    out, seen, cache = _generate_recording(model, press)
    assert out.shape == (1, 70) and int(out.min()) >= 0 and int(out.max()) < model.config.vocab_size
    assert seen[0] == [0, 0] and seen[1] == [40, 40]  # the prompt is whole until the first decode step compresses it
    peaks = [max(layers) for layers in seen[2:]]
    assert max(peaks) <= max_tokens + every
    assert max(peaks) > max_tokens  # it grew between re-scorings, then came back
    assert seen[-1] and max(seen[-1]) <= max_tokens + every and cache.stats()["logical_tokens"] == 69


def test_decode_time_rescoring_with_a_padded_batch_and_quantization():
    model = kvpress.wrap(tiny_model("llama"))
    press = SnapKVPress(compression_ratio=0.5, window_size=4, kernel_size=3, max_tokens=40, every=8)
    out, seen, _ = _generate_recording(model, press, quant="int8-int4:g8:r4:s2", length=60, pads=(0, 9), new=40)
    assert out.shape == (2, 100)
    assert max(max(layers) for layers in seen[2:]) <= 40 + 8 + 9  # + the padded row's filler slots


def test_rescoring_with_a_large_bound_changes_nothing():
    model = tiny_model("llama")
    ids, mask = left_padded_batch(batch=1, length=30, pads=(0,))
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GEN)
    kvpress.wrap(model, press="snapkv:0.0:window_size=4,max_tokens=200,every=3")
    assert torch.equal(ref, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, **GEN))


def test_snapkv_keeps_its_window_queries_when_it_rescores():
    press = SnapKVPress(compression_ratio=0.5, window_size=4, max_tokens=16, every=4)
    model = kvpress.wrap(tiny_model("llama"))
    _, _, cache = _generate_recording(model, press, new=10)
    for layer in cache.layers:  # the window slid over the generated tokens and survived the compressions
        assert layer.press_state.queries is not None and layer.press_state.queries.shape[2] == 4


def test_specs_parse():
    press = parse_press("snapkv:0.5:max_tokens=2048,every=64")
    assert isinstance(press, SnapKVPress) and (press.max_tokens, press.every, press.layers) == (2048, 64, "uniform")
    press = parse_press("tova:0.25:layers=pyramid")
    assert press.layers == "pyramid" and press.every is None and press.compression_ratio == 0.25
    press = parse_press("kvzip:0.5:layers=pyramid,max_tokens=100,budget=uniform")
    assert press.layers == "pyramid" and press.max_tokens == 100
    with pytest.raises(ValueError, match="budget=uniform with layers=pyramid"):  # KVzip's default budget is global
        parse_press("kvzip:0.5:layers=pyramid")


@pytest.mark.parametrize("spec, message", [
    ("snapkv:0.5:layers=diamond", "layers must be one of"),
    ("snapkv:0.5:max_tokens=100,every=0", "every .* must be a positive integer"),
    ("snapkv:0.5:max_tokens=100,every=x", "every='x' is not an integer"),
    ("snapkv:0.5:every=64", "set max_tokens too"),
    ("kvzip:0.5:max_tokens=100,every=8", "KVzipPress cannot re-score while decoding"),
])
def test_bad_values_give_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_press(spec)


def test_layer_budget_checks_its_layer_index():
    with pytest.raises(ValueError, match="layer_idx must be in"):
        KnormPress(compression_ratio=0.5, layers="pyramid").layer_budget(10, 4, 4)
