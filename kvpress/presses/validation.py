"""Shape and value checks shared by the press scoring functions, so bad input fails with a clear ValueError."""
import torch


def check_valid_mask(valid: torch.Tensor, batch: int, n_tokens: int) -> None:
    """Check that `valid` is a (batch, n_tokens) bool mask of real (non-padding) stored tokens."""
    if valid.dtype != torch.bool or tuple(valid.shape) != (batch, n_tokens):
        raise ValueError(
            f"valid must be a bool tensor of shape (B, T) = ({batch}, {n_tokens}); "
            f"got dtype {valid.dtype} and shape {tuple(valid.shape)}"
        )


def check_keys(keys: torch.Tensor, name: str = "keys") -> tuple[int, int, int, int]:
    """Check that `keys` is a floating (B, Hkv, T, D) tensor and return its four sizes."""
    if keys.dim() != 4 or not keys.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor of shape (B, Hkv, T, D); "
            f"got dtype {keys.dtype} and shape {tuple(keys.shape)}"
        )
    batch, kv_heads, n_tokens, head_dim = keys.shape
    return batch, kv_heads, n_tokens, head_dim


def check_queries(queries: torch.Tensor, keys: torch.Tensor) -> int:
    """Check that `queries` (B, Hq, Q, D) matches `keys` (B, Hkv, T, D) and return the group size Hq // Hkv."""
    batch, kv_heads, _, head_dim = check_keys(keys)
    if queries.dim() != 4 or not queries.is_floating_point():
        raise ValueError(
            f"queries must be a floating tensor of shape (B, Hq, Q, D); "
            f"got dtype {queries.dtype} and shape {tuple(queries.shape)}"
        )
    q_batch, q_heads, _, q_dim = queries.shape
    if q_batch != batch or q_dim != head_dim:
        raise ValueError(
            f"queries shape {tuple(queries.shape)} does not match keys shape {tuple(keys.shape)} "
            f"in batch size or head dim"
        )
    if q_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({q_heads}) must be a positive multiple of kv heads ({kv_heads}) for grouped-query attention"
        )
    return q_heads // kv_heads


def check_sm_scale(sm_scale: float) -> None:
    """Check that the softmax scale is a positive finite number."""
    if not isinstance(sm_scale, (int, float)) or not (0.0 < float(sm_scale) < float("inf")):
        raise ValueError(f"sm_scale must be a positive finite number (usually head_dim ** -0.5); got {sm_scale!r}")


def check_per_token_scores(tensor: torch.Tensor, name: str, shape: tuple[int, int, int]) -> None:
    """Check that a per-token tensor (scores, attention mass) has shape (B, Hkv, T)."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape (B, Hkv, T) = {shape}; got {tuple(tensor.shape)}")


def check_non_negative_int(value: object, name: str) -> int:
    """Check that `value` is a non-negative int (bool rejected) and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return value
