"""Models loaded with bitsandbytes 8-bit / 4-bit weights wrap and generate like any other (bitsandbytes' CPU
backend here; the same path runs on a GPU)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import kvpress
from tiny_models import COMMON, left_padded_batch

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "head_dim": 32})).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [8, 4])
def test_bnb_model_wraps_and_generates(checkpoint, bits):
    config = BitsAndBytesConfig(load_in_8bit=bits == 8, load_in_4bit=bits == 4)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map="cpu")
    ids, mask = left_padded_batch(batch=2, length=20, pads=(0, 4))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
    kvpress.wrap(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw), plain)
    cache = kvpress.KVPressCache(model.config, press="knorm:0.5", quant="int8-int4:g16:r4:s2")
    out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kw)
    kvpress.unwrap(model)
    assert out.shape == plain.shape
    assert cache.stats()["stored_tokens"] < cache.stats()["logical_tokens"]
