"""Candidate KV layouts simulated on a plain DynamicCache (fake quantization): choose a codec before building kernels.

Why: a new layout (keys per channel as in KIVI, other bit widths, rotations) costs a Triton kernel, its torch twin
and a quantize-and-store path; this measures what it would buy first. Per prose text (bench_quant's texts), the
prompt is prefilled once at full precision; each candidate then gets a copy of that cache whose tokens outside the
sinks and the full-precision window are replaced by their quantize-dequantize round trip (the project's affine
math, kernels/affine.py), and the next `--cont` real tokens are teacher-forced one at a time, tokens leaving the
window being quantized as they leave (per-channel keys: a block of G tokens once the window holds window + G).
Reported: KL(full || candidate) per decoded token, top-1 agreement and the theoretical bytes per token per kv-head
of the encoded middle (codes plus fp16 scale and zero).

    python eval/quant_codec_sim.py --configs 'k4t64-v2t64-rkv' 'k4c128-v2t64-rv' --out quant_codec_sim
Candidate grammar: k<bits><t|c><group>[x<clip>]-v<bits>t<group>[x<clip>][-r<k|v|kv>]: t = per token, group along
head_dim; c = per channel, a scale and zero per channel over blocks of <group> tokens (keys only); x<clip> = each
group clamped to that fraction of its range first; r = Hadamard rotation. Bits 1-8: widths without a packed layout
(3) take the same math unpacked.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

import kvpress
from kvpress.eval.tasks.haystack import paragraph_starts
from kvpress.kernels.affine import affine_codes, dequantize, quantize
from kvpress.kernels.affine_layout import SUPPORTED_BITS
from kvpress.kernels.rotation import hadamard_rotation
from kvpress.hf_compat import cache_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import RESULTS_DIR, TEXT_FRACTIONS, compare, prose_token_ids  # noqa: E402

CANDIDATE = re.compile(r"k([1-8])([tc])(\d+)(?:x([\d.]+))?-v([1-8])t(\d+)(?:x([\d.]+))?(?:-r(kv|k|v))?")


@dataclass(frozen=True)
class Candidate:
    """One simulated layout: key bits / axis / group, value bits / group, which parts are rotated."""

    name: str
    k_bits: int
    k_per_channel: bool
    k_group: int
    v_bits: int
    v_group: int
    rotate: str
    k_clip: float = 1.0
    v_clip: float = 1.0

    @classmethod
    def parse(cls, name: str) -> Candidate:
        match = CANDIDATE.fullmatch(name)
        if match is None:
            raise ValueError(f"candidate {name!r} does not match "
                             "k<bits><t|c><group>[x<clip>]-v<bits>t<group>[x<clip>][-r<k|v|kv>]")
        kb, axis, kg, kc, vb, vg, vc, rot = match.groups()
        return cls(name, int(kb), axis == "c", int(kg), int(vb), int(vg), rot or "", float(kc or 1), float(vc or 1))

    def key_block(self) -> int:
        """Tokens encoded together: G for per-channel keys, 1 otherwise."""
        return self.k_group if self.k_per_channel else 1

    def bytes_per_token(self, head_dim: int) -> float:
        """Codes plus fp16 scale and zero per group, keys then values, per token and kv head (a per-channel block
        of G tokens holds D scales and zeros: 4 D / G bytes per token, as D / G groups per token do)."""
        return head_dim * (self.k_bits + self.v_bits) / 8 + 4 * head_dim / self.k_group + 4 * head_dim / self.v_group


def round_trip(x: torch.Tensor, bits: int, group: int | None, clip: float = 1.0) -> torch.Tensor:
    """quantize then dequantize along the last dimension (the project's affine math); clip < 1 first clamps each
    group to that fraction of its range around the range's middle (an MSE-minded grid instead of min/max)."""
    if clip < 1.0:
        size = x.shape[-1] if group is None else group
        grouped = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
        lo, hi = torch.aminmax(grouped, dim=-1, keepdim=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * clip
        x = torch.maximum(torch.minimum(grouped, mid + half), mid - half).reshape(x.shape)
    if bits in SUPPORTED_BITS:
        codes, scale, zero = quantize(x, bits, group)
        return dequantize(codes, scale, zero, bits, group, x.shape[-1], torch.float32)
    return unpacked_round_trip(x, bits, group)


def unpacked_round_trip(x: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """The library's affine round trip (kernels/affine.affine_codes) without packing, for widths that have no packed
    layout (3): the same fp16-rounded scale and zero and the same rounding as the built widths."""
    size = x.shape[-1] if group is None else group
    grouped = x.float().reshape(*x.shape[:-1], x.shape[-1] // size, size)
    codes, scale, zero = affine_codes(grouped, -1, bits)
    return torch.addcmul(zero.float().unsqueeze(-1), codes.float(), scale.float().unsqueeze(-1)).reshape(x.shape)


def fake_quantize(x: torch.Tensor, bits: int, group: int, per_channel: bool, rotation: torch.Tensor | None,
                  clip: float = 1.0):
    """x (B, H, T, D) float32 after a round trip; per channel: T is a multiple of `group` (blocks of tokens)."""
    y = x.float() if rotation is None else x.float() @ rotation
    if per_channel:
        b, h, t, d = y.shape
        blocks = y.reshape(b, h, t // group, group, d).transpose(-1, -2)
        y = round_trip(blocks.contiguous(), bits, None, clip).transpose(-1, -2).reshape(b, h, t, d)
    else:
        y = round_trip(y, bits, group, clip)
    return (y if rotation is None else y @ rotation.T).to(x.dtype)


class SimulatedCache:
    """Quantizes a DynamicCache's tokens in place as they leave the full-precision window."""

    def __init__(self, cache: DynamicCache, cand: Candidate, sinks: int, window: int) -> None:
        self.cache, self.cand, self.sinks, self.window = cache, cand, sinks, window
        self.done = sinks  # tokens [sinks, done) hold their round trip

    def flush(self) -> None:
        """Encode every whole block of tokens that has left the window."""
        block = self.cand.key_block()
        for layer in self.cache.layers:
            length = layer.keys.shape[-2]
            end = self.sinks + (max(0, length - self.window - self.sinks) // block) * block
            if end <= self.done:
                continue
            head_dim = layer.keys.shape[-1]
            rot = hadamard_rotation(head_dim) if self.cand.rotate else None
            k_rot = rot if "k" in self.cand.rotate else None
            v_rot = rot if "v" in self.cand.rotate else None
            span = slice(self.done, end)
            layer.keys[:, :, span] = fake_quantize(layer.keys[:, :, span], self.cand.k_bits, self.cand.k_group,
                                                   self.cand.k_per_channel, k_rot, self.cand.k_clip)
            layer.values[:, :, span] = fake_quantize(layer.values[:, :, span], self.cand.v_bits, self.cand.v_group,
                                                     False, v_rot, self.cand.v_clip)
        self.done = max(self.done, end)


def decode(model, cache: DynamicCache, ids: torch.Tensor, prefix: int, sim: SimulatedCache | None) -> torch.Tensor:
    """Teacher-forced steps after the prefix; float32 log-probs per step."""
    out = []
    for i in range(prefix, ids.shape[1] - 1):
        if sim is not None:
            sim.flush()
        logits = model(input_ids=ids[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True).logits
        out.append(torch.log_softmax(logits[0, -1].float(), dim=-1))
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, help="candidates, e.g. k4t64-v2t64-rkv")
    parser.add_argument("--texts", type=int, default=2)
    parser.add_argument("--prefix", type=int, default=4096)
    parser.add_argument("--cont", type=int, default=48)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="quant_codec_sim")
    args = parser.parse_args(argv)
    command = "python eval/quant_codec_sim.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cands = [Candidate.parse(c) for c in args.configs]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = kvpress.load_default_model()
    text_cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    starts = paragraph_starts()
    rows: dict[str, list[dict]] = {c.name: [] for c in cands}
    with torch.no_grad():
        for frac in TEXT_FRACTIONS[: args.texts]:
            ids = prose_token_ids(tok, starts[int(frac * len(starts))], args.prefix + args.cont + 1)
            targets = ids[0, args.prefix + 1 :]
            base = DynamicCache(config=model.config)
            model(input_ids=ids[:, : args.prefix], **cache_kwargs(model, base), use_cache=True, logits_to_keep=1)
            ref = decode(model, copy.deepcopy(base), ids, args.prefix, None)
            for cand in tqdm(cands, desc=f"text {frac}", leave=False):
                cache = copy.deepcopy(base)
                got = decode(model, cache, ids, args.prefix, SimulatedCache(cache, cand, args.sinks, args.window))
                rows[cand.name].append(compare(ref, got, targets, args.cont))
    summary = {}
    for cand in cands:
        r = rows[cand.name]
        summary[cand.name] = {
            "kl_mean": sum(x["kl_mean"] for x in r) / len(r), "kl_max": max(x["kl_max"] for x in r),
            "top1_agree": sum(x["top1_agree"] for x in r) / len(r),
            "middle_bytes_per_token_head": cand.bytes_per_token(head_dim),
            "middle_over_16bit": cand.bytes_per_token(head_dim) / (4 * head_dim), "texts": r,
        }
    out = {"command": command, "head_dim": head_dim, "args": vars(args), "candidates": summary}
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    lines = [f"`{command}`", "", "| candidate | KL mean | KL max | top-1 | middle B/tok/head | middle / 16-bit |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['kl_mean']:.5f} | {s['kl_max']:.4f} | {100 * s['top1_agree']:.1f}% | "
                     f"{s['middle_bytes_per_token_head']:.1f} | {s['middle_over_16bit']:.3f} |")
    (RESULTS_DIR / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
