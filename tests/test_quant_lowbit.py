"""Low-bit specs and the Hadamard rotation: `int4-int2` / `int2-int2` parse and count their bytes, the rotation is
orthogonal, a rotating codec round-trips, rotated stores are attended through the public entry points (twin and
Triton) as their un-rotated tokens would be, and a cache with rotated 2-bit codes decodes close to the full one."""
import pytest
import torch
from test_kernels_fixtures import DEVICE

import kvpress
import kvpress.kernels as kernels
from kvpress.kernels.reference import decode_attention_multi_reference
from kvpress.kernels.reference_plain import decode_attention_multi_plain
from kvpress.kernels.rotation import hadamard_rotation
from kvpress.kernels.store import KVStore
from kvpress.quant import QuantSpec
from kvpress.quant.affine import AffineCodec
from kvpress.hf_compat import cache_kwargs


@pytest.mark.parametrize("text, k_bits, v_bits, rotate, bytes64", [
    ("int4-int2", 4, 2, "kv", 32 + 4 + 16 + 4),  # 2-bit specs rotate by default, values in groups of 64
    ("int4-int2:rotnone:g32", 4, 2, "none", 60),
    ("int2-int2:g16:r32:s4", 2, 2, "kv", 16 + 4 + 16 + 16),
    ("int4-int4", 4, 4, "none", 76),
    ("int4-int2:rotkv", 4, 2, "kv", 56),
    ("int8-int4:rotv", 8, 4, "v", 108),
])
def test_low_bit_specs_parse_and_count_bytes(text, k_bits, v_bits, rotate, bytes64) -> None:
    spec = QuantSpec.parse(text)
    assert (spec.k_bits, spec.v_bits, spec.rotate) == (k_bits, v_bits, rotate)
    assert QuantSpec.parse(str(spec)) == spec
    assert spec.fit(64).bytes_per_token_head(64) == bytes64
    codec = spec.build_codec()
    assert (codec.rotate_k, codec.rotate_v) == ("k" in rotate, "v" in rotate)


def test_two_bit_values_default_to_groups_of_64() -> None:
    assert QuantSpec.parse("int4-int2").group_size == 64 and QuantSpec.parse("int4-int4").group_size == 32
    assert QuantSpec.parse("int2-int2").fit(128).group_size == 64
    assert QuantSpec.parse("int4-int2").fit(32).group_size == 16  # shrunk to fit head_dim / 2


def test_bad_rotation_options_raise() -> None:
    with pytest.raises(ValueError, match="rotk"):
        QuantSpec.parse("int4-int2:rot3")
    with pytest.raises(ValueError, match="rotate"):
        QuantSpec(rotate="q")
    assert QuantSpec(4, 2).rotate == "kv" and QuantSpec().rotate == "none"
    with pytest.raises(ValueError, match="power-of-two"):
        QuantSpec.parse("int4-int2:rotk").fit(96)


def test_hadamard_rotation_is_orthogonal_and_shared() -> None:
    r = hadamard_rotation(64)
    torch.testing.assert_close(r @ r.T, torch.eye(64), atol=1e-6, rtol=0)
    assert hadamard_rotation(64) is r and torch.equal(r.abs(), torch.full_like(r, 0.125))


@pytest.mark.parametrize("bits", [(4, 2), (2, 2)])
def test_rotating_codec_round_trips_closer_on_outlier_channels(bits) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, 64, generator=gen)
    x[..., 3] *= 20  # an outlier channel, as real keys have
    errors = []
    for rotate in (False, True):
        codec = AffineCodec(*bits, None, 32, rotate, rotate)
        k, v = codec.decode(codec.encode(x, x), 64, torch.float32)
        errors.append(float((k - x).norm() / x.norm()))
        if rotate:  # decode rotates back
            codec_plain = AffineCodec(*bits, None, 32)
            assert float((k - x).norm()) < float((codec_plain.decode(codec_plain.encode(x, x), 64, torch.float32)[0]
                                                  - x).norm())
    assert errors[1] < errors[0]


def _rotated_store(x_k, x_v, codec: AffineCodec) -> tuple[KVStore, torch.Tensor, torch.Tensor]:
    """A contiguous store of codec's codes of (x_k, x_v) (B, H, T, D), with its rotations, and the decoded K, V."""
    fields = codec.encode(x_k, x_v)
    batch, _, tokens, head_dim = x_k.shape
    rk, rv = codec.rotations(head_dim, x_k.device)
    store = KVStore(k=fields["k"], v=fields["v"], k_scale=fields["k_scale"], k_zero=fields["k_zero"],
                    v_scale=fields["v_scale"], v_zero=fields["v_zero"], k_bits=codec.k_bits, v_bits=codec.v_bits,
                    block_table=torch.arange(batch, dtype=torch.int32, device=x_k.device)[:, None],
                    kv_end=tokens, k_rotation=rk, v_rotation=rv)
    k, v = codec.decode(fields, head_dim, torch.float32)
    return store, k, v


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rotate", [(True, False), (False, True), (True, True)])
def test_rotated_stores_attend_like_their_decoded_tokens(backend, rotate) -> None:
    gen = torch.Generator().manual_seed(3)
    keys, values = (torch.randn(2, 2, 40, 64, generator=gen).to(DEVICE) for _ in range(2))
    middle, k_mid, v_mid = _rotated_store(keys, values, AffineCodec(4, 2, None, 32, *rotate))
    window_k, window_v = (torch.randn(2, 2, 9, 64, generator=gen).to(DEVICE) for _ in range(2))
    window = KVStore(k=window_k, v=window_v, block_table=middle.block_table, kv_end=9)
    q = torch.randn(2, 6, 64, generator=gen).to(DEVICE)
    with kernels.use_backend(backend):
        out, lse = kernels.decode_attention_multi(q, (middle, window), 0.125)
        scores = torch.zeros(2, 6, 49, device=DEVICE)
        kernels.decode_attention_multi(q, (middle, window), 0.125, scores=scores, score_offsets=(0, 40))
    table = middle.block_table
    plain = KVStore(k=torch.cat((k_mid, window_k), 2), v=torch.cat((v_mid, window_v), 2), block_table=table,
                    kv_end=49)
    want_scores = torch.zeros(2, 6, 49, device=DEVICE)
    want, want_lse = decode_attention_multi_reference(q, (plain,), 0.125, scores=want_scores, score_offsets=(0,))
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(scores, want_scores, atol=2e-4, rtol=2e-4)
    plain_out, plain_lse = decode_attention_multi_plain(q, (middle, window), 0.125)  # the oracle rotates back
    torch.testing.assert_close(out, plain_out, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(lse, plain_lse, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rotated_extend_attends_like_decoded_tokens(backend) -> None:
    gen = torch.Generator().manual_seed(4)
    keys, values = (torch.randn(1, 2, 33, 64, generator=gen) for _ in range(2))
    middle, k_mid, v_mid = _rotated_store(keys, values, AffineCodec(2, 2, 16, 16, True, True))
    q = torch.randn(1, 4, 5, 64, generator=gen)
    with kernels.use_backend(backend):
        out, lse = kernels.extend_attention_multi(q, (middle,), 0.125)
    plain = KVStore(k=k_mid, v=v_mid, block_table=middle.block_table, kv_end=33)
    want, want_lse = kernels.extend_attention_multi(q, (plain,), 0.125)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)


def _tiny_head64():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, pad_token_id=0)
    return kvpress.wrap(AutoModelForCausalLM.from_config(config).eval())


def _decode_logprobs(model, spec, ids, steps):
    """Prefill ids[:, :-steps], then feed the rest one token at a time: (steps + 1, vocab) log-probs."""
    cache = kvpress.KVPressCache(model.config, quant=spec)
    with torch.no_grad():
        out = [model(input_ids=ids[:, :-steps], **cache_kwargs(model, cache)).logits[:, -1]]
        for i in range(ids.shape[1] - steps, ids.shape[1]):
            out.append(model(input_ids=ids[:, i : i + 1], **cache_kwargs(model, cache)).logits[:, -1])
    return torch.log_softmax(torch.cat(out).float(), -1), cache


@pytest.mark.parametrize("spec", ["int4-int2:r4:s2", "int2-int2:g16:kcnone:r4:s2", "int2-int2:kc16:r4:s2",
                                  "int4-int2:rotnone:r4:s2"])
def test_low_bit_cache_bytes_and_backends_agree(spec) -> None:
    model = _tiny_head64()
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    with kernels.use_backend("reference"):
        ref, cache = _decode_logprobs(model, spec, ids, 24)  # 24 decode steps: the window flushes into the codes
    assert cache.layers[0].kv.main.length > 36
    codec = QuantSpec.parse(spec).build_codec()
    assert cache.layers[0].kv.main.store.nbytes() == codec.bytes_per_token(64) * cache.layers[0].kv.main.store.capacity
    full, _ = _decode_logprobs(model, None, ids, 24)
    assert float((full.exp() * (full - ref)).sum(-1).mean()) < 0.05  # close to the full cache
    with kernels.use_backend("triton"):
        tri, _ = _decode_logprobs(model, spec, ids, 24)
    torch.testing.assert_close(tri, ref, atol=2e-3, rtol=2e-3)
