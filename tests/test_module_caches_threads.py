"""Module-level caches shared by threads that generate concurrently: the multi-store launch-plan cache
(kernels/launch_plans.py) and the causal-mask check of a forward's chunk (attention._causal_chunk), each hammered
from 8 threads with a tiny switch interval so that threads interleave inside every cache operation."""
import sys
import threading

import pytest
import torch

N_THREADS = 8


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond (the default 5 ms would run most loops without any interleaving)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def _run_threads(fn) -> None:
    """Run fn(i) in N_THREADS threads started together; re-raise the first failure."""
    errors, start = [], threading.Barrier(N_THREADS)

    def body(i):
        try:
            start.wait()
            fn(i)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_launch_plan_cache_from_8_threads(fast_switching, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 threads find, remember, invalidate (a store replaced by new tensors) and evict (a cache of 8 plans for 32
    keys) plans at once: no operation fails, a found plan is always the one remembered for its key and stores,
    and the cache never holds more than its bound."""
    from kvpress.kernels import launch_plans
    from kvpress.kernels.launch_plans import LaunchPlan, cached_plans, clear_plans, find_plan, plan_key, remember_plan
    from kvpress.kernels.store import KVStore

    monkeypatch.setattr(launch_plans, "MAX_PLANS", 8)
    clear_plans()
    q = torch.zeros(1, 4, 1, 32)

    def new_store() -> KVStore:
        return KVStore(k=torch.zeros(1, 2, 4, 32), v=torch.zeros(1, 2, 4, 32),
                       block_table=torch.zeros(1, 1, dtype=torch.int32), kv_end=4)  # fmt: skip

    def new_plan(tag) -> LaunchPlan:
        return LaunchPlan(refs=(), layouts=(), split_ends=(1,), shared=tag, out_strides=(), lse_strides=(),
                          constexprs={}, grid=(1, 1, 1), num_warps=4, total_splits=1)  # fmt: skip

    hits = [0] * N_THREADS

    def work(i):
        stores = [(new_store(),) for _ in range(4)]  # this thread's 4 keys (32 in all)
        for step in range(1000):
            j = step % 4
            if step % 37 == 0:  # a store that grew: new tensors, the cached plan must not be used for them
                stores[j] = (new_store(),)
            key = plan_key(q, stores[j], ("thread", i, j))
            plan = find_plan(key, stores[j])
            if plan is None:
                remember_plan(key, stores[j], new_plan((i, j, id(stores[j][0].k))))
            else:
                assert plan.shared == (i, j, id(stores[j][0].k)), (plan.shared, i, j)
                hits[i] += 1
            assert cached_plans() <= 8

    _run_threads(work)
    assert sum(hits) > 0  # the cache was used, not only filled
    clear_plans()


def test_causal_check_from_8_threads(fast_switching, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 threads, each with its own chunk masks (plain causal after left padding, or causal with one key hidden),
    ask _causal_chunk for 4 layers per forward at once: every answer is its own mask's, and each thread compares a
    mask once per forward (the layers after the first reuse the result: no host sync per layer)."""
    from kvpress import attention

    length = 6
    positions = torch.arange(length)

    def masks(i):
        pads = torch.tensor([i % 3, (i + 1) % 4])
        causal = (positions[None, :] <= positions[:, None])[None, None] & (
            positions[None, None, None, :] >= pads[:, None, None, None])
        other = causal.clone()
        other[0, 0, 5, 3] = False
        return [(m, attention._chunk_validity(m), pads) for m in (causal, other)]

    per_thread = [masks(i) for i in range(N_THREADS)]
    comparisons = [0] * N_THREADS
    as_bool = attention._as_bool
    owner = threading.local()

    def counting_as_bool(mask):
        comparisons[owner.index] += 1
        return as_bool(mask)

    monkeypatch.setattr(attention, "_as_bool", counting_as_bool)
    forwards = 60

    def work(i):
        owner.index = i
        for step in range(forwards):
            mask, valid, pads = per_thread[i][step % 2]
            for _layer in range(4):
                causal, start = attention._causal_chunk(mask, valid, None)
                assert causal is (step % 2 == 0), (i, step)
                assert start.tolist() == pads.tolist()

    _run_threads(work)
    assert comparisons == [forwards] * N_THREADS
