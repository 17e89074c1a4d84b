"""Seeded randomized differential test: many drawn configurations of (architecture, dtype, batch and left padding,
press (uniform or per-head budgets), quantization, prefix cache, chunked prefill, decoding mode) checked against
invariants that need no golden outputs.

Invariants per case:
- no compression: the output equals the plain (unwrapped) model's;
- with a prefix cache: the same output as without one (same batching), on a cold and on a warm cache;
- a deterministic press without quantization: every row gets its batch-1 output (greedy);
- `stats()["nbytes"]` equals the bytes of the tensors the cache holds (`cache.tensors()`, none counted twice), and a
  wrapped generate reports the same bytes as an explicit cache;
- the PrefixCache's pool invariants hold and no page stays held by a finished call.

"Same output" allows what floating point can do and nothing more: per row, the tokens are equal up to the first
step where they differ, and at every step up to and including that one the two runs' logits agree within the
dtype's tolerance (a near-tie may flip; a wrong cache cannot hide behind it). Beam search compares its sequences,
or, when they differ, the beams' scores within the tolerance.

CI runs KVPRESS_MATRIX_CASES (default 120, about 2 minutes on 2 cores) cases from KVPRESS_MATRIX_SEED (default 0); every failure names its seed
and case id, and `KVPRESS_MATRIX_SEED=<seed> pytest tests/test_matrix.py -k "case_<id>-"` replays it. Soak:
`KVPRESS_MATRIX_CASES=2000 pytest -q tests/test_matrix.py`.
"""
from __future__ import annotations

import functools
import os
import random
import sys
from dataclasses import dataclass

import pytest
import torch

import kvpress
from kvpress.config import head_dim_of
from kvpress.presses.registry import parse_press
from kvpress.quant.spec import QuantSpec
from kvpress.hf_compat import cache_kwargs
from tiny_models import head_dim_model, tiny_model

N_CASES = int(os.environ.get("KVPRESS_MATRIX_CASES", "120"))
SEED = int(os.environ.get("KVPRESS_MATRIX_SEED", "0"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CUDA the kernels run on Triton, every case in bf16
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3_96")
ALL_SLIDING = {"mistral"}  # every layer slides: a press or quant is refused at wrap
NO_PREFIX = {"mistral", "gemma3"}  # sliding layers: prefix sharing is refused
PRESSES = (None, "snapkv", "tova", "h2o", "streaming", "knorm")
QUANTS = (None, "int8-int4", "int4")  # and int2-int2 (keys per channel), drawn on its own stream in draw()
# max |logit difference| where tokens may still flip: fp32 / bf16 rounding; quantized runs may also flip a code whose
# input moved by rounding (one int4 step of one value), never more
TOLERANCE = {(torch.float32, False): 2e-3, (torch.bfloat16, False): 0.15,
             (torch.float32, True): 0.05, (torch.bfloat16, True): 0.25}
SELECTION_TOLERANCE = 0.25  # seed 0 case 369: knorm:0.75 keeps another of two tokens whose key norms tie to ~1e-7
# (press, arch) whose scores tie within rounding by construction: knorm ranks keys by L2 norm, and these tiny models
# normalise keys (k_norm, unit weights at init) before RoPE, so every key norm is sqrt(head_dim) = 4 up to eps: a row's
# scores span ~2e-4 (~1000 float32 steps of 2.4e-7) and rounding-different keys (batched vs alone: other chunk
# boundaries) swap two tokens at the budget's edge (seed 7 case 467: scores -0x1.fffcfap+1 for both tokens 2 and 16
# alone, 2 ulps apart batched). Their rows compare to batch 1 with selection_flips (step 0 stays strict).
DEGENERATE_SCORES = {("knorm", "gemma3"), ("knorm", "qwen3")}


@dataclass(frozen=True)
class Case:
    """One drawn configuration (everything a failure needs to be understood)."""

    case_id: int
    arch: str
    dtype: torch.dtype
    lengths: tuple[int, ...]  # prompt length per row (left padded to the longest)
    press: str | None
    quant: str | None
    pool_quant: bool  # the PrefixCache also keeps the request's codes (shared in place)
    prefix: bool
    chunk: int | None  # prefill_chunk_size
    mode: str  # greedy | sample | beam
    n_return: int
    max_new_tokens: int
    shared_prefix: int  # rows start with this many common tokens (so prefix hits happen within a batch)

    def tag(self) -> str:
        return f"[KVPRESS_MATRIX_SEED={SEED} case {self.case_id}: {self}]"


def draw(case_id: int) -> Case:
    """The case_id-th case of seed SEED (independent of N_CASES, so a case replays alone)."""
    rng = random.Random(SEED * 1_000_003 + case_id)
    arch = rng.choice(ARCHS)
    batch = rng.randint(1, 3)
    press = rng.choice(PRESSES)
    quant = rng.choice(QUANTS)
    if press is not None:
        options = ["window_size=8"] if press == "snapkv" else []
        budget = random.Random(SEED * 31 + case_id).choice(["uniform", "uniform", "adaptive", "global"])
        options += [] if budget == "uniform" else [f"budget={budget}"]  # own stream: earlier cases draw as before
        press = f"{press}:{rng.choice([0.25, 0.5, 0.75])}" + (f":{','.join(options)}" if options else "")
    if quant is not None:
        if random.Random(SEED * 37 + case_id).random() < 0.3:  # own stream: earlier cases draw as before
            quant = "int2-int2"  # keys per channel in blocks (a default block: per token where storage needs it)
        quant = f"{quant}:r{rng.choice([4, 16, 128])}:s{rng.choice([0, 2, 4])}"  # no g option: default groups
    mode = rng.choice(["greedy", "greedy", "sample", "beam"])
    prefix = arch not in NO_PREFIX and rng.random() < 0.5
    return Case(case_id=case_id, arch=arch, dtype=_on_device(rng.choice([torch.float32, torch.bfloat16])),
                lengths=tuple(rng.randint(4, 60) for _ in range(batch)), press=press, quant=quant,
                pool_quant=rng.random() < 0.5, prefix=prefix, chunk=rng.choice([None, None, 5, 16]), mode=mode,
                n_return=1 if mode == "greedy" else rng.choice([1, 2]), max_new_tokens=rng.randint(2, 6),
                shared_prefix=rng.choice([0, 0, 8, 24]))


def _on_device(drawn: torch.dtype) -> torch.dtype:
    """The drawn dtype on CPU, bf16 on CUDA (the dtype the GPU serves); drawn either way so a seed replays alike."""
    return torch.bfloat16 if DEVICE == "cuda" else drawn


@functools.lru_cache(maxsize=None)
def _model(arch: str, dtype: torch.dtype):
    model = head_dim_model(96, "phi3") if arch == "phi3_96" else tiny_model(arch)
    return model.to(DEVICE, dtype)


def _prompts(case: Case) -> list[list[int]]:
    rng = random.Random(SEED * 7919 + case.case_id)
    common = [rng.randint(3, 127) for _ in range(case.shared_prefix)]
    return [(common + [rng.randint(3, 127) for _ in range(n)]) for n in case.lengths]


def _batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


def _gen_kwargs(case: Case) -> dict:
    kwargs = dict(max_new_tokens=case.max_new_tokens, min_new_tokens=case.max_new_tokens, pad_token_id=0,
                  eos_token_id=None, return_dict_in_generate=True, output_logits=True, output_scores=True,
                  num_return_sequences=case.n_return)
    if case.mode == "greedy":
        kwargs.update(do_sample=False)
    elif case.mode == "sample":
        kwargs.update(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    else:
        kwargs.update(do_sample=False, num_beams=2)
    if case.chunk is not None:
        kwargs.update(prefill_chunk_size=case.chunk)
    return kwargs


def _generate(case: Case, model, ids, mask, **extra):
    torch.manual_seed(SEED * 31 + case.case_id)  # sampling draws the same numbers in every run of a case
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **{**_gen_kwargs(case), **extra})


def assert_same_output(case: Case, ref, out, what: str, selection_flips: bool = False) -> None:
    """Tokens equal up to each row's first difference, logits within tolerance through it (see module doc).
    `selection_flips`: after the prompt (step 0), a press may keep a different one of two near-equal scored tokens
    (its scores come from rounding-different K/V), so later steps get SELECTION_TOLERANCE."""
    tol = TOLERANCE[case.dtype, case.quant is not None]
    if case.mode == "beam":
        if torch.equal(ref.sequences, out.sequences):
            return
        diff = (ref.sequences_scores.float() - out.sequences_scores.float()).abs().max().item()
        assert diff <= tol, f"{case.tag()} {what}: beam sequences differ and their scores by {diff:.3g} > {tol}"
        return
    width = ref.sequences.shape[1] - len(ref.logits)
    assert ref.sequences.shape == out.sequences.shape, f"{case.tag()} {what}: shapes differ"
    assert torch.equal(ref.sequences[:, :width], out.sequences[:, :width]), f"{case.tag()} {what}: prompts differ"
    for row in range(ref.sequences.shape[0]):
        for step, (a, b) in enumerate(zip(ref.logits, out.logits)):
            tol = max(tol, SELECTION_TOLERANCE) if selection_flips and step > 0 else tol
            diff = (a[row].float() - b[row].float()).abs().max().item()
            assert diff <= tol, (f"{case.tag()} {what}: row {row} step {step}: logits differ by {diff:.3g} > {tol} "
                                 f"(tokens equal so far)")
            if ref.sequences[row, width + step] != out.sequences[row, width + step]:
                break  # a near-tie flipped: later steps continue from different tokens


def check_nbytes(case: Case, cache) -> None:
    """stats() bytes are exactly the bytes of the distinct tensors the cache holds."""
    tensors = cache.tensors()
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert cache.stats()["nbytes"] == held, f"{case.tag()}: stats nbytes {cache.stats()['nbytes']} != held {held}"
    ids = [id(t) for t in tensors]
    assert len(ids) == len(set(ids)), f"{case.tag()}: a tensor is counted twice in cache.tensors()"


def check_pool(case: Case, prefix_cache) -> None:
    """Pool / tree invariants, nothing held by a finished call."""
    try:
        prefix_cache.check_invariants()
    except RuntimeError as err:
        raise AssertionError(f"{case.tag()}: {err}") from None
    assert prefix_cache.stats()["live_matches"] == 0, f"{case.tag()}: a finished call still holds prefix hits"


def run_case(case: Case) -> None:
    model = _model(case.arch, case.dtype)
    kvpress.unwrap(model)
    compressed = case.press is not None or case.quant is not None
    if case.arch in ALL_SLIDING and compressed:
        with pytest.raises(ValueError, match="sliding window"):
            kvpress.wrap(model, press=case.press, quant=case.quant)
        assert not kvpress.is_wrapped(model), case.tag()
        case = Case(**{**case.__dict__, "press": None, "quant": None})  # the rest of the case runs uncompressed
        compressed = False
    ids, mask = _batch(_prompts(case))
    try:
        kvpress.wrap(model, press=case.press, quant=case.quant)
        out = _generate(case, model, ids, mask)
        stats = kvpress.last_generate_stats(model)
        if not compressed:  # 1. no compression: the plain model's output
            kvpress.unwrap(model)
            assert_same_output(case, _generate(case, model, ids, mask), out, "kvpress vs plain model")
            kvpress.wrap(model)
        head_dim = head_dim_of(model.config)
        if case.quant is not None:  # the default groups were fitted to the model's head_dim
            QuantSpec.parse(stats["quant"]).check_head_dim(head_dim)

        # 2. an explicit cache: the same output and bytes as wrap's, bytes == tensors held
        cache = kvpress.KVPressCache(model.config, press=case.press, quant=case.quant)
        explicit = _generate(case, model, ids, mask, past_key_values=cache)
        assert torch.equal(explicit.sequences, out.sequences), f"{case.tag()}: explicit cache output differs"
        check_nbytes(case, cache)
        assert cache.stats()["nbytes"] == stats["nbytes"], f"{case.tag()}: wrapped and explicit bytes differ"

        # 3. deterministic press without quant (greedy): each row its batch-1 output
        if case.press is not None and case.quant is None and case.mode == "greedy" and ids.shape[0] > 1:
            width = ids.shape[1]
            for row, prompt in enumerate(_prompts(case)):
                single_ids, single_mask = _batch([prompt])
                single = _generate(case, model, single_ids, single_mask)
                pad = width - len(prompt)
                ref = type(single)(sequences=torch.cat([ids[row:row + 1, :pad], single.sequences], dim=1),
                                   logits=tuple(step for step in single.logits))
                row_out = type(out)(sequences=out.sequences[row:row + 1], logits=tuple(s[row:row + 1] for s in out.logits))
                assert_same_output(case, ref, row_out, f"row {row} batched vs alone",
                                   selection_flips=(case.press.split(":")[0], case.arch) in DEGENERATE_SCORES)

        # 4. prefix cache: same output as without, cold then warm; pool invariants, no leaks
        if case.prefix:
            press = parse_press(case.press) if case.press else None
            try:
                if press is not None:
                    press.check_prefix_sharing()
            except ValueError:
                return  # this press refuses prefix sharing (it needs every prompt query): nothing more to compare
            pool_quant = None
            if case.pool_quant and case.quant is not None:
                # the request's codes as wrap resolves them for prefix sharing (per-token keys: pages)
                pool_quant = str(kvpress.resolve_config(quant=case.quant, paged=True, head_dim=head_dim).quant)
            prefix_cache = kvpress.PrefixCache(max_tokens=2048, page_size=4, quant=pool_quant)
            kvpress.wrap(model, press=case.press, quant=case.quant, paged=True, prefix_cache=prefix_cache)
            reference = out
            if case.quant is not None and case.chunk is not None:
                # a quantized chunked prefill attends over its earlier chunks quantized; a prefix-cached prompt is
                # attended in full precision and quantized at its end (DeferredEncoding), as an unchunked prefill
                kvpress.wrap(model, press=case.press, quant=case.quant)
                reference = _generate(case, model, ids, mask, prefill_chunk_size=None)
                kvpress.wrap(model, press=case.press, quant=case.quant, paged=True, prefix_cache=prefix_cache)
            for attempt in ("cold", "warm"):
                shared = _generate(case, model, ids, mask)
                check_pool(case, prefix_cache)
                assert_same_output(case, reference, shared, f"prefix cache ({attempt}) vs none",
                                   selection_flips=case.press is not None)
            paged = kvpress.PagedKVCache(model.config, prefix_cache, press=case.press, quant=case.quant)
            _generate(case, model, ids, mask, past_key_values=paged)
            check_nbytes(case, paged)
            check_pool(case, prefix_cache)
    finally:
        kvpress.unwrap(model)


@pytest.mark.parametrize("case_id", range(N_CASES), ids=[f"case_{i}-" for i in range(N_CASES)])
def test_matrix_case(case_id):
    run_case(draw(case_id))


@pytest.mark.parametrize("seed, case_id", [(7, 467), (0, 369)])
def test_pinned_degenerate_score_cases(monkeypatch, seed, case_id):
    """Soak failures replayed in CI: knorm on a k-normed model (DEGENERATE_SCORES) keeps another of two tokens whose
    scores tie to an ulp; every invariant still holds with that explicit allowance."""
    monkeypatch.setattr(sys.modules[__name__], "SEED", seed)
    case = draw(case_id)
    assert (case.press.split(":")[0], case.arch) in DEGENERATE_SCORES, case
    run_case(case)


@pytest.mark.parametrize("arch, degenerate", [("gemma3", True), ("qwen3", True), ("llama", False)])
def test_degenerate_scores_are_the_k_normed_models(arch, degenerate):
    """DEGENERATE_SCORES stays justified: on the k-normed tiny models every stored key's L2 norm is sqrt(head_dim)
    to 1e-3 (knorm's scores tie within rounding), on the others norms spread widely."""
    model = _model(arch, torch.float32)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cache = kvpress.KVPressCache(model.config)
    try:
        kvpress.wrap(model)
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(model, cache))
    finally:
        kvpress.unwrap(model)
    layer = next(layer for layer in cache.layers if not layer.is_sliding)
    norms = torch.linalg.vector_norm(layer.stored_kv()[0].float(), dim=-1)
    spread = (norms.max() - norms.min()).item()
    assert (spread < 1e-3) == degenerate, (arch, spread)
    assert (("knorm", arch) in DEGENERATE_SCORES) == degenerate


@pytest.mark.parametrize("press", ["streaming:0.25", "knorm:0.5", "tova:0.25", "snapkv:0.5:window_size=8"])
def test_chunked_prefill_ending_with_a_one_token_chunk_compresses_after_the_prompt(press):
    """Found by the matrix (seed 0, case 24): a prompt of 76 tokens in chunks of 5 ends with a 1-token chunk, which
    compressed the cache before the prompt's last token attended (it looked like a decode step); case 316 (TOVA):
    that token's query was not observed by the press."""
    model = _model("llama", torch.float32)
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                  output_logits=True)
    ids = torch.randint(3, 128, (1, 76), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    try:
        kvpress.wrap(model, press=press)
        whole = model.generate(input_ids=ids, **kwargs)
        chunked = model.generate(input_ids=ids, prefill_chunk_size=5, **kwargs)
    finally:
        kvpress.unwrap(model)
    assert torch.equal(whole.sequences, chunked.sequences)
    for a, b in zip(whole.logits, chunked.logits):
        assert (a - b).abs().max() < 1e-3
