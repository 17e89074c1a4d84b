"""Launch plans of the multi-store kernel, cached per layer: a decode step re-launches the same stores with new row
bounds, so the store checks, split counts, addressing, strides and constexprs are built once
per (query shape, stores); each call adds its own tensors, bounds and logit offsets by field.

A plan is found by the stores' tensor ids and used only if weak references confirm that those very tensors are
still the ones passed (a store that grows or is replaced gets new tensors, hence a new plan; no plan keeps a
tensor alive). Row bounds are re-checked on every call, cheaply (Python ints or (B,) int tensors).

Threads that generate concurrently share the cache: every operation on it holds one lock (a plan, once built, is
never mutated, so a plan found under the lock is used outside it).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_PLANS = 256  # about one per layer and query length in use; least recently used plans are dropped


@dataclass
class LaunchPlan:
    """What one launch needs besides this call's tensors and bounds (which the launcher adds by field, per store):
    a plan never keeps a tensor alive."""

    refs: tuple  # weak references to every store tensor of the key (None where the store has none)
    layouts: tuple  # per store: strides, block-table row stride, page size (decode.StorePointers without tensors)
    split_ends: tuple  # per store: the end of its range of grid splits
    shared: tuple  # (kv_heads, group, num_queries, qk_scale)
    out_strides: tuple
    lse_strides: tuple
    constexprs: dict  # the kernel's constexpr parameters by name
    grid: tuple
    num_warps: int
    total_splits: int


_plans: OrderedDict = OrderedDict()
_plans_lock = threading.Lock()  # guards every read and write of _plans


def plan_key(q: torch.Tensor, stores: tuple, extra: tuple) -> tuple:
    """Cache key: the query's shape / strides / dtype / device, `extra` (settings), and per store the ids of its
    tensors, whether its bounds are ints, and its encoding."""
    per_store = tuple(
        (*(id(t) for t in store.tensors()), isinstance(store.kv_start, int), isinstance(store.kv_end, int),
         *store.encoding())
        for store in stores
    )  # fmt: skip
    return (tuple(q.shape), q.stride(), q.dtype, q.device, extra, per_store)


def find_plan(key: tuple, stores: tuple) -> LaunchPlan | None:
    """The cached plan of `key` if its stores' tensors are still the very ones passed, else None."""
    with _plans_lock:
        plan = _plans.get(key)
        if plan is None:
            return None
        for store, refs in zip(stores, plan.refs):
            for t, ref in zip(store.tensors(), refs):
                if (ref is None) != (t is None) or (ref is not None and ref() is not t):
                    del _plans[key]
                    return None
        _plans.move_to_end(key)
        return plan


def remember_plan(key: tuple, stores: tuple, plan: LaunchPlan) -> LaunchPlan:
    """Store a new plan with weak references to the stores' tensors and return it."""
    plan.refs = tuple(tuple(None if t is None else weakref.ref(t) for t in store.tensors()) for store in stores)
    with _plans_lock:
        _plans[key] = plan
        _plans.move_to_end(key)  # another thread may have remembered the same key meanwhile
        if len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
    return plan


def clear_plans() -> None:
    """Forget every cached plan (tests)."""
    with _plans_lock:
        _plans.clear()


def cached_plans() -> int:
    """Number of cached plans (tests)."""
    with _plans_lock:
        return len(_plans)
