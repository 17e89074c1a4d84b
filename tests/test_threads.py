"""Thread safety: one PrefixCache shared by 8 threads generating concurrently on one wrapped model gives the
single-threaded outputs, keeps the pool invariants and leaks no page."""
import random
import sys
import threading

import torch

import kvpress
from tiny_models import tiny_model

GEN = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
N_THREADS = 8
PER_THREAD = 4


def _prompts(seed=7):
    """Random prompts over 4 shared documents (cut at random lengths) plus private tails."""
    rng = random.Random(seed)
    docs = [[rng.randrange(3, 128) for _ in range(rng.randrange(20, 70))] for _ in range(4)]
    prompts = []
    for _ in range(N_THREADS * PER_THREAD):
        doc = rng.choice(docs)
        prompts.append(doc[: rng.randrange(len(doc) // 2, len(doc) + 1)] + [rng.randrange(3, 128)
                                                                           for _ in range(rng.randrange(1, 12))])
    return prompts


def _run_threads(fn, n):
    errors, start = [], threading.Barrier(n)

    def body(i):
        try:
            start.wait()
            fn(i)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_threads_sharing_a_prefix_cache_match_the_single_threaded_run():
    model = tiny_model("llama")
    prompts = _prompts()
    kvpress.wrap(model)
    reference = [model.generate(input_ids=torch.tensor([p]), **GEN)[0].tolist() for p in prompts]
    prefix_cache = kvpress.PrefixCache(max_tokens=16 * 80)  # small enough that stores evict while others match
    kvpress.wrap(model, paged=True, prefix_cache=prefix_cache)
    outputs: dict[int, list[int]] = {}

    def work(i):
        for j in range(i, len(prompts), N_THREADS):
            outputs[j] = model.generate(input_ids=torch.tensor([prompts[j]]), **GEN)[0].tolist()

    for _ in range(2):  # the second round mostly hits
        outputs.clear()
        _run_threads(work, N_THREADS)
        assert [outputs[j] for j in range(len(prompts))] == reference
        prefix_cache.check_invariants()
    stats = prefix_cache.stats()
    assert stats["live_matches"] == 0 and stats["matched_tokens"] > 0
    pool, tree = prefix_cache.pool, prefix_cache.tree
    assert all(pool.refcount(p) == (p in tree.held_pages()) for p in range(pool.num_pages))
    with prefix_cache._lock:  # the callers are gone: dropping the stored prefixes frees every page
        tree.evict(pool.num_pages)
    assert pool.pages_free == pool.num_pages
    prefix_cache.check_invariants()


def test_prefix_cache_operations_from_threads_keep_the_refcounts():
    """match/store/release hammered from 8 threads (no model): the lock keeps tree, pool and counters consistent."""
    prefix_cache = kvpress.PrefixCache(max_tokens=16 * 64)
    layers = lambda n: [{"k": torch.zeros(1, n, 4), "v": torch.zeros(1, n, 4)} for _ in range(2)]  # noqa: E731
    prefix_cache.store("ns", list(range(16)), layers(16))

    def work(i):
        rng = random.Random(i)
        for _ in range(200):
            tokens = [rng.randrange(4) for _ in range(rng.randrange(16, 80))]
            hit = prefix_cache.match("ns", tokens)
            try:
                prefix_cache.store("ns", tokens, layers(len(tokens)))
            except RuntimeError as err:  # a full pool (every page locked by the other threads) is allowed
                assert "PrefixCache full" in str(err)
            finally:
                prefix_cache.release(hit)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: unlocked, this breaks the refcounts within a few calls
    try:
        _run_threads(work, N_THREADS)
    finally:
        sys.setswitchinterval(interval)
    prefix_cache.check_invariants()
    assert prefix_cache.stats()["live_matches"] == 0
