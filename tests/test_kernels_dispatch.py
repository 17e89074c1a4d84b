"""Dispatch: torch twins for CPU inputs, KVPRESS_KERNELS forces a backend, bad values raise, and the public
entry points return the chosen implementation's results."""
import pytest
import torch
from test_kernels_fixtures import make_store

import kvpress.kernels as kernels
from kvpress.kernels import dispatch


def test_cpu_inputs_use_the_torch_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVPRESS_KERNELS", raising=False)
    assert kernels.kernel_backend(torch.device("cpu")) == "reference"
    expected = "triton" if dispatch.HAS_TRITON else "reference"
    assert kernels.kernel_backend(torch.device("cuda")) == expected


def test_environment_variable_forces_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPRESS_KERNELS", "reference")
    assert kernels.kernel_backend(torch.device("cuda")) == "reference"
    monkeypatch.setenv("KVPRESS_KERNELS", "Triton")
    assert kernels.kernel_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("KVPRESS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="KVPRESS_KERNELS"):
        kernels.kernel_backend(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_entry_points_agree_under_either_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    monkeypatch.setenv("KVPRESS_KERNELS", backend)
    store = make_store([0, 2], [21, 40], kv_heads=1, head_dim=32, k_bits=8, v_bits=4, k_group=16, v_group=16)
    q = torch.randn(2, 4, 2, 32, device=store.k.device)
    out, lse = kernels.extend_attention(q, *store.args(), 0.2, *store.bits())
    d_out, d_lse = kernels.decode_attention(q[:, :, 0], *store.args(), 0.2, *store.bits())
    torch.testing.assert_close(d_out, out[:, :, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d_lse, lse[:, :, 0], atol=1e-4, rtol=1e-4)
    key_args = (store.k, store.k_scale, store.k_zero, store.block_table, store.kv_start, store.kv_end)
    mass = kernels.attention_scores(q, *key_args, lse, 0.2, 8, 16)
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 1), 8.0, device=q.device), atol=1e-4, rtol=1e-4)


def test_quantize_store_needs_a_tensor() -> None:
    with pytest.raises(ValueError, match="tensor arguments"):
        kernels.quantize_store(bits=8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantize_store_routes_to_the_chosen_implementation(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    quantize = pytest.importorskip("kvpress.kernels.quantize")
    calls = []
    monkeypatch.setattr(quantize, "quantize_store_reference", lambda *a, **k: calls.append(("reference", a, k)))
    monkeypatch.setattr(quantize, "quantize_store_triton", lambda *a, **k: calls.append(("triton", a, k)))
    monkeypatch.setenv("KVPRESS_KERNELS", backend)
    x = torch.zeros(2)
    kernels.quantize_store(x, bits=8)
    assert len(calls) == 1 and calls[0][0] == backend and calls[0][1][0] is x and calls[0][2] == {"bits": 8}


def test_host_launch_arithmetic_matches_triton() -> None:
    """The launchers' plain-Python cdiv / next_power_of_2 (triton's are constexpr functions, ~2 us per host call)."""
    triton = pytest.importorskip("triton")
    from kvpress.kernels.triton_compat import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
