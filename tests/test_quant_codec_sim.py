"""eval/quant_codec_sim.py's unpacked round trip (how 3-bit candidates are simulated) must be the library's affine
math exactly where the library has a layout, so that simulated widths compare with the built ones."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval.quant_codec_sim as sim  # noqa: E402


@pytest.mark.parametrize("bits,group", [(2, 64), (4, 32), (4, None), (8, 16)])
def test_unpacked_round_trip_equals_the_library(bits, group):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 40, 64) * torch.logspace(-2, 1, 64)
    codes, scale, zero = sim.quantize(x, bits, group)
    expected = sim.dequantize(codes, scale, zero, bits, group, 64, torch.float32)
    assert torch.equal(sim.unpacked_round_trip(x, bits, group), expected)


def test_three_bit_round_trip_uses_eight_levels_within_half_a_step():
    torch.manual_seed(3)
    x = torch.randn(4, 64)
    y = sim.round_trip(x, 3, 32)
    groups, rebuilt = x.reshape(4, 2, 32), y.reshape(4, 2, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 7.5
    assert (rebuilt - groups).abs().amax(-1).le(step * 0.5 + 1e-3).all()
    assert all(len(torch.unique(g)) <= 8 for g in rebuilt.reshape(8, 32))
    assert len(torch.unique(rebuilt[0, 0])) > 4  # really 3 bits, not 2


def test_candidate_grammar_takes_three_bits():
    cand = sim.Candidate.parse("k3c64-v3t64-rkv")
    assert (cand.k_bits, cand.k_per_channel, cand.v_bits, cand.rotate) == (3, True, 3, "kv")
    assert cand.bytes_per_token(64) == sim.Candidate.parse("k4t64-v2t64-rkv").bytes_per_token(64) == 56
