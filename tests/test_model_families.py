"""Every decoder family with full or sliding attention: quantization fits each head_dim, and what kvpress cannot run
exactly (all-sliding models with a press, chunked attention, softcapping, learned sinks) is refused at wrap."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GptOssConfig, Llama4TextConfig, LlamaConfig

import kvpress
from kvpress.quant.spec import QuantSpec
from tiny_models import COMMON, head_dim_model, tiny_model

GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("head_dim,arch", [(64, "llama"), (80, "llama"), (96, "phi3"), (128, "llama"), (256, "llama")])
@pytest.mark.parametrize("quant", ["int8-int4", "int4", "int8", "int4-int2", "int2-int2"])
def test_default_quantization_generates_on_every_head_dim(head_dim, arch, quant):
    model = kvpress.wrap(head_dim_model(head_dim, arch), quant=quant)
    ids = torch.randint(3, 128, (2, 205), generator=torch.Generator().manual_seed(head_dim))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GEN)
    assert out.shape == (2, 209)
    stats = kvpress.last_generate_stats(model)
    assert stats["applied_to_layers"]["quant"] == [0, 1]
    fitted = QuantSpec.parse(stats["quant"])
    fitted.check_head_dim(head_dim)
    assert stats["nbytes"] < stats["fp16_nbytes"]  # the middle really is quantized
    if head_dim in (64, 128, 256):  # the default is unchanged where it already fitted
        assert fitted == QuantSpec.parse(quant)


def test_default_groups_shrink_to_the_largest_fitting_power_of_two():
    assert QuantSpec.parse("int8-int4").fit(96).group_size == 16
    assert QuantSpec.parse("int8-int4").fit(80).group_size == 8
    assert QuantSpec.parse("int8").fit(80).group_size == 8  # 16 divides 80 but straddles the kernels' halves (40)
    assert QuantSpec.parse("int2:rotnone").fit(96).group_size == 8  # 16 divides 48 but straddles a 2-bit quarter
    assert QuantSpec.parse("int8-int4:r16").fit(96).group_size == 16  # r/s options keep the default groups
    assert QuantSpec.parse("int8-int4").fit(128) == QuantSpec.parse("int8-int4")


def test_default_rotation_is_dropped_where_no_hadamard_exists_and_an_explicit_one_is_refused():
    assert QuantSpec.parse("int4-int2").fit(96).rotate == "none"  # the 2-bit specs rotate by default
    assert QuantSpec.parse("int4-int2").fit(128).rotate == "kv"
    model = head_dim_model(96, "phi3")
    with pytest.raises(ValueError, match=r"power-of-two head_dim.*nearest valid spec is 'int4-int2:kgnone:g8.*rotnone'"):
        kvpress.wrap(model, quant="int4-int2:rotkv")
    with pytest.raises(ValueError, match="Hadamard"):
        kvpress.KVPressCache(model.config, quant="int8-int4:rotk")


def test_explicit_spec_that_cannot_fit_is_refused_before_any_work_naming_the_nearest_valid_spec():
    model = head_dim_model(96, "phi3")
    with pytest.raises(ValueError, match=r"nearest valid spec is 'int8-int4:kgnone:g16:r128:s4'"):
        kvpress.wrap(model, quant="int8-int4:g32")
    assert not kvpress.is_wrapped(model)
    with pytest.raises(ValueError, match=r"head_dim=96.*'int8-int4:kgnone:g16"):
        kvpress.KVPressCache(model.config, quant=QuantSpec(group_size=32))
    with pytest.raises(ValueError, match=r"nearest valid spec is 'int4-int4:kg16"):
        kvpress.KVPressCache(model.config, quant="int4:kg64:g16")
    kvpress.wrap(model)
    with pytest.raises(ValueError, match="nearest valid spec"):  # a per-call override is checked the same way
        model.generate(input_ids=torch.tensor([[5, 6, 7]]), quant="int8-int4:g32", **GEN)


def test_kernel_shape_limits_are_checked_at_wrap_when_the_kernels_run_on_triton():
    """With the Triton backend (forced here; CUDA models get it), what the kernels cannot take is refused at wrap /
    KVPressCache(...), before any work: 8-bit key groups of 32 straddle the two halves of head_dim 96, head_dim 320
    is larger than the tiles. The reference backend (CPU) takes them."""
    model = head_dim_model(96, "phi3")
    with kvpress.kernels.use_backend("triton"):
        with pytest.raises(ValueError, match="Triton kernels cannot run this cache: k_group: .*got 32.*nearest spec "
                                             "they take is 'int8-int4:kg16:g16:r128:s4'"):
            kvpress.wrap(model, quant="int8-int4:kg32:g16")
        assert not kvpress.is_wrapped(model)
        with pytest.raises(ValueError, match="Triton kernels cannot run this cache: k_group"):
            kvpress.KVPressCache(model.config, quant="int8-int4:kg32:g16")
        with pytest.raises(ValueError, match="head_dim 320 is larger than the 256"):
            kvpress.KVPressCache(LlamaConfig(**COMMON, head_dim=320))
        kvpress.wrap(model)  # the default spec fits the kernels too (g16 at head_dim 96)
        with pytest.raises(ValueError, match="Triton kernels cannot run"):  # a per-call override is checked too
            model.generate(input_ids=torch.tensor([[5, 6, 7]]), quant="int8-int4:kg32:g16", **GEN)
    kvpress.wrap(model, quant="int8-int4:kg32:g16")  # on CPU the reference kernels take any group the codec takes
    assert model.generate(input_ids=torch.tensor([[5, 6, 7]]), **GEN).shape == (1, 7)
    kvpress.KVPressCache(LlamaConfig(**COMMON, head_dim=320))


def test_all_sliding_model_refuses_a_press_or_quant_saying_why_and_runs_without():
    model = tiny_model("mistral")
    for setting in ({"press": "snapkv:0.5"}, {"quant": "int8-int4"}):
        with pytest.raises(ValueError, match="every attention layer of this model uses a sliding window"):
            kvpress.wrap(model, **setting)
        with pytest.raises(ValueError, match="sliding window"):
            kvpress.KVPressCache(model.config, **setting)
    assert not kvpress.is_wrapped(model)
    kvpress.wrap(model)
    ids = torch.randint(3, 128, (1, 40))
    model.generate(input_ids=ids, **GEN)
    stats = kvpress.last_generate_stats(model)
    assert stats["press"] is None and stats["applied_to_layers"] == {"press": [], "quant": []}
    with pytest.raises(ValueError, match="sliding window"):
        model.generate(input_ids=ids, press="snapkv:0.5", **GEN)


def test_hybrid_model_stats_name_the_compressed_layers():
    model = kvpress.wrap(tiny_model("gemma3"), press="knorm:0.5", quant="int8-int4:r4:s2")
    ids = torch.randint(3, 128, (1, 40))
    model.generate(input_ids=ids, **GEN)
    stats = kvpress.last_generate_stats(model)
    assert stats["applied_to_layers"] == {"press": [2], "quant": [2]}  # layers 0 and 1 slide
    assert stats["stored_tokens_per_layer"][2] < 40


def test_chunked_attention_is_refused():
    config = Llama4TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, attention_chunk_size=8,
                              num_local_experts=2, intermediate_size_mlp=128)
    assert "chunked_attention" in config.layer_types
    with pytest.raises(ValueError, match="chunked"):
        kvpress.KVPressCache(config)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="chunked attention"):
        kvpress.wrap(model)
    assert not kvpress.is_wrapped(model)


def test_attention_logit_softcapping_is_refused_by_name():
    config = Gemma2Config(**{**COMMON, "num_hidden_layers": 2}, head_dim=16, sliding_window=8)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        kvpress.wrap(model)
    with pytest.raises(ValueError, match="softcapping"):
        kvpress.KVPressCache(config)
    config.attn_logit_softcapping = None  # the same family without it is fine
    kvpress.KVPressCache(config)


def test_learned_attention_sinks_are_refused_by_name():
    config = GptOssConfig(**{**COMMON, "num_hidden_layers": 2}, head_dim=16, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=8)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"sinks.*s_aux|s_aux.*sinks"):
        kvpress.wrap(model)
    assert not kvpress.is_wrapped(model)
