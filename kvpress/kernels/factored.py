"""The "factored" dequantization of the attention kernel (KVPRESS_DEQUANT=factored): raw codes, exact in fp16, go
to the dots and each token's scale and zero are applied to the much smaller score / probability tiles
(keys: s * (q . c) + z * sum(q); values: (p * s) @ c + sum(p * z)), per group along head_dim.
Which store geometries use it: factored_fields. Default is "registers" until a GPU measurement says otherwise."""
import os

from kvpress.kernels.tile_loads import load_code_halves, load_scale_zero
from kvpress.kernels.triton_compat import tl, triton

DEQUANT_ENV = "KVPRESS_DEQUANT"
DEQUANT_MODES = ("registers", "factored")
_FACTORED_MIN_GROUP = 16  # a factored group is a dot operand dimension: tl.dot needs >= 16
_FACTORED_MAX_GROUPS_PER_HALF = 4  # more groups: the per-group score/probability work outgrows the saving


@triton.jit
def factored_query(q_half, HALF: tl.constexpr, GROUP: tl.constexpr):
    """One (BLOCK_M, HALF) query half as the key dot operand of the factored path, and its fp32 sums per group:
    unchanged and (BLOCK_M,) when one group spans the half or more; else (GROUPS, BLOCK_M, GROUP) and
    (GROUPS, BLOCK_M)."""
    if GROUP < HALF:
        GROUPS: tl.constexpr = HALF // GROUP
        q_half = tl.permute(tl.reshape(q_half, (q_half.shape[0], GROUPS, GROUP)), (1, 0, 2))
        qsum = tl.sum(q_half.to(tl.float32), 2)
    else:
        qsum = tl.sum(q_half.to(tl.float32), 1)
    return q_half, qsum


@triton.jit
def factored_key_scores(
    q_low, q_high, qsum_low, qsum_high, k_ptr, ks_ptr, kz_ptr, k_rows, ks_rows, stride_kx, stride_ksg, token_mask,
    qk_scale,
    HALF: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FP16_CODES: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) logits * qk_scale without dequantizing the key tile: per group g of token t,
    s_tg * (q_g . c_tg) + z_tg * sum(q_g), with the raw codes c as dot operands and fp32 accumulation.
    q_* / qsum_* come from factored_query. Masked tokens give 0 (the caller masks them)."""
    c_low, c_high = load_code_halves(k_ptr, k_rows, stride_kx, token_mask, HALF, BITS, GROUP, DOT_DTYPE, FP16_CODES)
    if GROUP >= 2 * HALF:  # one group per token: one scale per score column
        raw = tl.dot(q_low, tl.trans(c_low), input_precision=PRECISION)
        raw = tl.dot(q_high, tl.trans(c_high), raw, input_precision=PRECISION)
        scale, zero = load_scale_zero(ks_ptr, kz_ptr, ks_rows, 0, stride_ksg, token_mask, HALF, GROUP)
        qsum = qsum_low + qsum_high
        scores = raw * (scale * qk_scale)[None, :] + qsum[:, None] * (zero * qk_scale)[None, :]
    elif GROUP == HALF:  # one group per half
        raw_low = tl.dot(q_low, tl.trans(c_low), input_precision=PRECISION)
        raw_high = tl.dot(q_high, tl.trans(c_high), input_precision=PRECISION)
        s_low, z_low = load_scale_zero(ks_ptr, kz_ptr, ks_rows, 0, stride_ksg, token_mask, HALF, GROUP)
        s_high, z_high = load_scale_zero(ks_ptr, kz_ptr, ks_rows, 1, stride_ksg, token_mask, HALF, GROUP)
        scores = raw_low * s_low[None, :] + raw_high * s_high[None, :]
        scores += qsum_low[:, None] * z_low[None, :] + qsum_high[:, None] * z_high[None, :]
        scores = scores * qk_scale
    else:  # GROUPS per half: batched dots over the groups, then a sum over them
        raw_low = tl.dot(q_low, tl.permute(c_low, (0, 2, 1)), input_precision=PRECISION)  # (GROUPS, M, N)
        raw_high = tl.dot(q_high, tl.permute(c_high, (0, 2, 1)), input_precision=PRECISION)
        s_low, z_low = load_scale_zero(ks_ptr, kz_ptr, ks_rows, 0, stride_ksg, token_mask, HALF, GROUP)
        s_high, z_high = load_scale_zero(ks_ptr, kz_ptr, ks_rows, 1, stride_ksg, token_mask, HALF, GROUP)
        parts = raw_low * s_low[:, None, :] + qsum_low[:, :, None] * z_low[:, None, :]
        parts += raw_high * s_high[:, None, :] + qsum_high[:, :, None] * z_high[:, None, :]
        scores = tl.sum(parts, 0) * qk_scale
    return scores


@triton.jit
def factored_value_update(
    acc_low, acc_high, zacc_low, zacc_high, probs, alpha,
    v_ptr, vs_ptr, vz_ptr, v_rows, vs_rows, stride_vx, stride_vsg, token_mask,
    HALF: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FP16_CODES: tl.constexpr,
):  # fmt: skip
    """Rescale the accumulators by alpha and add one value tile without dequantizing it: per group g,
    acc_g += (P * s_g) @ C_g (the scale moves onto the fp32 probabilities P, cast to DOT_DTYPE afterwards) and
    zacc_g += P @ z_g (fp32, one number per row and group). Accumulator shapes follow factored_value_output."""
    c_low, c_high = load_code_halves(v_ptr, v_rows, stride_vx, token_mask, HALF, BITS, GROUP, DOT_DTYPE, FP16_CODES)
    if GROUP >= 2 * HALF:  # one group per token: both halves share the scaled probabilities; zacc_high unused
        scale, zero = load_scale_zero(vs_ptr, vz_ptr, vs_rows, 0, stride_vsg, token_mask, HALF, GROUP)
        scaled = (probs * scale[None, :]).to(DOT_DTYPE)
        acc_low = acc_low * alpha[:, None] + tl.dot(scaled, c_low, input_precision=PRECISION)
        acc_high = acc_high * alpha[:, None] + tl.dot(scaled, c_high, input_precision=PRECISION)
        zacc_low = zacc_low * alpha + tl.sum(probs * zero[None, :], 1)
    elif GROUP == HALF:  # one group per half
        s_low, z_low = load_scale_zero(vs_ptr, vz_ptr, vs_rows, 0, stride_vsg, token_mask, HALF, GROUP)
        s_high, z_high = load_scale_zero(vs_ptr, vz_ptr, vs_rows, 1, stride_vsg, token_mask, HALF, GROUP)
        scaled_low = (probs * s_low[None, :]).to(DOT_DTYPE)
        scaled_high = (probs * s_high[None, :]).to(DOT_DTYPE)
        acc_low = acc_low * alpha[:, None] + tl.dot(scaled_low, c_low, input_precision=PRECISION)
        acc_high = acc_high * alpha[:, None] + tl.dot(scaled_high, c_high, input_precision=PRECISION)
        zacc_low = zacc_low * alpha + tl.sum(probs * z_low[None, :], 1)
        zacc_high = zacc_high * alpha + tl.sum(probs * z_high[None, :], 1)
    else:  # GROUPS per half: (GROUPS, M, N) scaled probabilities, batched dots into (GROUPS, M, GROUP)
        s_low, z_low = load_scale_zero(vs_ptr, vz_ptr, vs_rows, 0, stride_vsg, token_mask, HALF, GROUP)
        s_high, z_high = load_scale_zero(vs_ptr, vz_ptr, vs_rows, 1, stride_vsg, token_mask, HALF, GROUP)
        scaled_low = (probs[None, :, :] * s_low[:, None, :]).to(DOT_DTYPE)
        scaled_high = (probs[None, :, :] * s_high[:, None, :]).to(DOT_DTYPE)
        acc_low = acc_low * alpha[None, :, None] + tl.dot(scaled_low, c_low, input_precision=PRECISION)
        acc_high = acc_high * alpha[None, :, None] + tl.dot(scaled_high, c_high, input_precision=PRECISION)
        zacc_low = zacc_low * alpha[None, :] + tl.sum(probs[None, :, :] * z_low[:, None, :], 2)
        zacc_high = zacc_high * alpha[None, :] + tl.sum(probs[None, :, :] * z_high[:, None, :], 2)
    return acc_low, acc_high, zacc_low, zacc_high


@triton.jit
def factored_value_output(acc_low, acc_high, zacc_low, zacc_high, HALF: tl.constexpr, GROUP: tl.constexpr):
    """Unnormalised (BLOCK_M, HALF) output halves from the factored accumulators: acc + zacc per group.

    Accumulators are acc (BLOCK_M, HALF) and zacc (BLOCK_M,) when one group spans a half or more, else
    acc (GROUPS, BLOCK_M, GROUP) and zacc (GROUPS, BLOCK_M)."""
    if GROUP >= 2 * HALF:
        out_low = acc_low + zacc_low[:, None]
        out_high = acc_high + zacc_low[:, None]
    elif GROUP == HALF:
        out_low = acc_low + zacc_low[:, None]
        out_high = acc_high + zacc_high[:, None]
    else:
        out_low = tl.reshape(tl.permute(acc_low + zacc_low[:, :, None], (1, 0, 2)), (acc_low.shape[1], HALF))
        out_high = tl.reshape(tl.permute(acc_high + zacc_high[:, :, None], (1, 0, 2)), (acc_high.shape[1], HALF))
    return out_low, out_high


def dequant_mode(mode: str | None = None) -> str:
    """The dequantization variant of the Triton attention kernel: `mode` if given, else $KVPRESS_DEQUANT (read at
    every call), else "registers" (today's kernel). "factored" moves the affine onto scores / probabilities."""
    chosen = mode if mode is not None else (os.environ.get(DEQUANT_ENV, "").strip().lower() or "registers")
    if chosen not in DEQUANT_MODES:
        source = "dequant" if mode is not None else DEQUANT_ENV
        raise ValueError(f"{source} must be one of {DEQUANT_MODES}; got {chosen!r}")
    return chosen


def factored_fields(
    mode: str, head_dim: int, k_bits: int, v_bits: int, k_group: int, v_group: int
) -> tuple[bool, bool]:
    """(factor keys, factor values) for a resolved dequantization mode and store geometry (groups resolved).

    A quantized field is factored when its groups span the whole head, exactly one half, or split a half into
    2..4 groups of >= 16 elements (3D tiles and batched dots; e.g. 32 and 64 for head_dim 128 or 256, 16 and 32 for
    64). Narrower groups (< 16, below tl.dot's minimum operand size) or more groups per half (the per-group
    score / probability work, rows x tokens per group, would outgrow the saved per-element affine) and 16-bit
    fields keep the register path.
    """
    if mode != "factored":
        return False, False
    half = head_dim // 2

    def factor(bits: int, group: int) -> bool:
        if bits == 16:
            return False
        if group >= half:
            return True
        return group >= _FACTORED_MIN_GROUP and half // group <= _FACTORED_MAX_GROUPS_PER_HALF

    return factor(k_bits, k_group), factor(v_bits, v_group)
