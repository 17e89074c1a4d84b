"""A wrapped tiny model generates the same tokens whether the kernels run as Triton (interpreted on CPU) or as
their torch twins: the attention path really goes through the dispatch."""
import pytest
import torch

from transformers import AutoModelForCausalLM, LlamaConfig

import kvpress
from tiny_models import COMMON, left_padded_batch


def _tiny_llama(head_dim: int):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "head_dim": head_dim})).eval()


def _generate(backend: str, quant: str, press, head_dim: int = 32):
    model = kvpress.wrap(_tiny_llama(head_dim))
    ids, mask = left_padded_batch(batch=2, length=24, pads=(0, 5))
    cache = kvpress.KVPressCache(model.config, quant=quant, press=press)
    with torch.no_grad(), kvpress.kernels.use_backend(backend):
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6,
                             do_sample=False, pad_token_id=0, eos_token_id=None, prefill_chunk_size=16,
                             output_logits=True, return_dict_in_generate=True)
    return out


@pytest.mark.parametrize("press", [None, "h2o:0.0:max_tokens=40,recent=4"])
def test_triton_and_reference_generate_the_same_tokens(press):
    quant = "int8-int4:g8:r4:s2"  # tiny window so the quantized middle is read by the kernels
    ref = _generate("reference", quant, press)
    tri = _generate("triton", quant, press)
    assert torch.equal(ref.sequences, tri.sequences)
    for a, b in zip(ref.logits, tri.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_a_padded_head_dim_generates_the_same_tokens_on_both_backends():
    """head_dim 96 (Phi-3's): the Triton kernels pad each half to 64; the default value group adapts to 16."""
    quant = "int8-int4:r4:s2"
    ref = _generate("reference", quant, None, head_dim=96)
    tri = _generate("triton", quant, None, head_dim=96)
    assert torch.equal(ref.sequences, tri.sequences)
    for a, b in zip(ref.logits, tri.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
