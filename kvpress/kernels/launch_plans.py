"""Launch plans of the multi-store kernel, cached per layer: a decode step re-launches the same stores with new row
bounds, so the store checks, split counts, addressing, constexprs and the ~150-entry argument list are built once
per (query shape, stores) and only the per-call entries (q, outputs, bounds, scores) are patched afterwards.

A plan is found by the stores' tensor ids and used only if weak references confirm that those very tensors are
still the ones passed (a store that grows or is replaced gets new tensors, hence a new plan; no plan keeps a
tensor alive). Row bounds are re-checked on every call, cheaply (Python ints or (B,) int tensors).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_PLANS = 256  # about one per layer and query length in use; least recently used plans are dropped


@dataclass
class LaunchPlan:
    """What one launch needs besides the per-call tensors: `args` with None at the patched positions (q, outputs,
    scores, and every store's tensors and bounds), so that a plan never keeps a tensor alive."""

    refs: tuple  # weak references to every store tensor of the key (None where the store has none)
    args: list
    store_slots: list  # per store: where its 9 per-call entries (k, v, scales, zeros, table, start, end) begin
    grid: tuple
    num_warps: int
    total_splits: int


_plans: OrderedDict = OrderedDict()


def plan_key(q: torch.Tensor, stores: tuple, extra: tuple) -> tuple:
    """Cache key: the query's shape / strides / dtype / device, `extra` (settings), and per store the ids of its
    tensors, whether its bounds are ints, and its bits / groups."""
    per_store = tuple(
        (*(id(t) for t in store[:7]), isinstance(store[7], int), isinstance(store[8], int), *store[9:])
        for store in stores
    )
    return (tuple(q.shape), q.stride(), q.dtype, q.device, extra, per_store)


def find_plan(key: tuple, stores: tuple) -> LaunchPlan | None:
    """The cached plan of `key` if its stores' tensors are still the very ones passed, else None."""
    plan = _plans.get(key)
    if plan is None:
        return None
    for store, refs in zip(stores, plan.refs):
        for t, ref in zip(store[:7], refs):
            if (ref is None) != (t is None) or (ref is not None and ref() is not t):
                del _plans[key]
                return None
    _plans.move_to_end(key)
    return plan


def remember_plan(key: tuple, stores: tuple, plan_fields: dict) -> LaunchPlan:
    """Store a new plan (weak references to the stores' tensors) and return it."""
    refs = tuple(tuple(None if t is None else weakref.ref(t) for t in store[:7]) for store in stores)
    plan = LaunchPlan(refs=refs, **plan_fields)
    _plans[key] = plan
    if len(_plans) > MAX_PLANS:
        _plans.popitem(last=False)
    return plan


def check_bounds(stores: tuple, batch: int, device: torch.device) -> None:
    """Per-call check of every store's row bounds: ints >= 0, or int32/int64 (B,) tensors on the query's device."""
    for i, store in enumerate(stores):
        for label, t in (("kv_start", store[7]), ("kv_end", store[8])):
            if isinstance(t, torch.Tensor):
                if t.dtype not in (torch.int32, torch.int64) or tuple(t.shape) != (batch,) or t.device != device:
                    raise ValueError(
                        f"store {i} {label} must be an int32/int64 ({batch},) tensor on {device}; "
                        f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                    )
            elif isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"store {i} {label} must be an int >= 0 or a (B,) tensor; got {t!r}")


def clear_plans() -> None:
    """Forget every cached plan (tests)."""
    _plans.clear()


def cached_plans() -> int:
    """Number of cached plans (tests)."""
    return len(_plans)
