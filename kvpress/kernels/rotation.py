"""Orthogonal rotations of stored keys / values (randomised Hadamard: spreads outlier channels before low-bit codes,
the QuaRot / TurboQuant idea) and attention over stores that hold rotated tokens.

A store whose keys are k @ Rk and values v @ Rv (KVStore.k_rotation / v_rotation) is attended with q @ Rk (so
q.k is unchanged) and its output rotated back by Rv^T. The torch twins do it per store inside their one softmax; the
Triton entry points (multi.py) through `attend_rotated`: one launch per group of stores sharing rotations, one small
matmul on q and one on the output per group, outside the kernel, groups merged by log-sum-exp.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

import torch

from kvpress.kernels.merge import merge_attention_states
from kvpress.kernels.store import KVStore

ROTATION_SEED = 20240607  # one global sign pattern: every layer and codec instance shares the matrix


@lru_cache(maxsize=None)
def _hadamard_cpu(head_dim: int, seed: int) -> torch.Tensor:
    """H diag(signs) / sqrt(D) in float32 on CPU (Sylvester Hadamard, random +-1 signs from `seed`)."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim; got {head_dim}")
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < head_dim:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return (signs[:, None].float() * matrix) / head_dim**0.5


_ON_DEVICE: dict[tuple[int, int, str], torch.Tensor] = {}


def hadamard_rotation(head_dim: int, device: torch.device | str = "cpu", seed: int = ROTATION_SEED) -> torch.Tensor:
    """The (D, D) float32 orthogonal matrix R = diag(signs) H / sqrt(D): rotated x = x @ R, back: x @ R.T. One
    tensor per (D, seed, device), so stores built from it compare by identity."""
    key = (head_dim, seed, str(torch.device(device)))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = _hadamard_cpu(head_dim, seed).to(device)
    return _ON_DEVICE[key]


def has_rotations(stores: tuple[KVStore, ...]) -> bool:
    """Whether any store holds rotated keys or values."""
    return any(s.k_rotation is not None or s.v_rotation is not None for s in stores)


def attend_rotated(
    impl: Callable, q: torch.Tensor, stores: tuple[KVStore, ...], sm_scale: float, out_dtype: torch.dtype | None,
    scores: torch.Tensor | None = None, score_offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`impl` (a multi-store kernel or twin) over stores grouped by their (key, value) rotations: per group, q is
    rotated, the rotation-free stores attended in one call, the output rotated back; groups merged by lse."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(stores):
        groups.setdefault((id(s.k_rotation), id(s.v_rotation)), []).append(i)
    out = lse = None
    for members in groups.values():
        k_rot, v_rot = stores[members[0]].k_rotation, stores[members[0]].v_rotation
        plain = tuple(replace(stores[i], k_rotation=None, v_rotation=None) for i in members)
        q_g = q if k_rot is None else (q.float() @ k_rot).to(q.dtype)
        kwargs = {} if scores is None else {"scores": scores, "score_offsets": tuple(score_offsets[i] for i in members)}
        o, l = impl(q_g, plain, sm_scale, None, **kwargs)
        if v_rot is not None:
            o = o @ v_rot.T
        out, lse = (o, l) if out is None else merge_attention_states(out, lse, o, l)
    return (out if out_dtype is None else out.to(out_dtype)), lse
