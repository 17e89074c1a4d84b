"""Dispatch: torch twins for CPU inputs, use_backend / KVPRESS_KERNELS (read at import) force a backend, bad values
raise, and the public entry points return the chosen implementation's results."""
import pytest
import torch
from test_kernels_fixtures import make_store

import kvpress.kernels as kernels
from kvpress.kernels import dispatch


def test_cpu_inputs_use_the_torch_twins() -> None:
    with kernels.use_backend(None):
        assert kernels.kernel_backend(torch.device("cpu")) == "reference"
        expected = "triton" if dispatch.HAS_TRITON else "reference"
        assert kernels.kernel_backend(torch.device("cuda")) == expected


def test_use_backend_forces_a_backend_and_restores_the_previous_one() -> None:
    before = kernels.kernel_backend(torch.device("cpu"))
    with kernels.use_backend("reference"):
        assert kernels.kernel_backend(torch.device("cuda")) == "reference"
        with kernels.use_backend("Triton"):
            assert kernels.kernel_backend(torch.device("cpu")) == "triton"
        assert kernels.kernel_backend(torch.device("cuda")) == "reference"
    assert kernels.kernel_backend(torch.device("cpu")) == before
    with pytest.raises(ValueError, match="use_backend"):
        with kernels.use_backend("cuda"):
            pass


def test_environment_variable_is_validated_at_import() -> None:
    """KVPRESS_KERNELS is read once, when kvpress.kernels is imported: a bad value fails there, naming it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "KVPRESS_KERNELS": "cuda"}
    proc = subprocess.run([sys.executable, "-c", "import kvpress.kernels.dispatch"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "KVPRESS_KERNELS must be 'triton', 'reference' or unset" in proc.stderr
    env["KVPRESS_KERNELS"] = "reference"
    code = "import torch, kvpress.kernels as k; print(k.kernel_backend(torch.device('cuda')))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "reference", proc.stderr[-2000:]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_entry_points_agree_under_either_backend(backend: str) -> None:
    store = make_store([0, 2], [21, 40], kv_heads=1, head_dim=32, k_bits=8, v_bits=4, k_group=16, v_group=16)
    q = torch.randn(2, 4, 2, 32, device=store.k.device)
    with kernels.use_backend(backend):
        out, lse = kernels.extend_attention_multi(q, (store,), 0.2)
        scores = torch.full((2, 4, 40), -torch.inf, device=q.device)
        d_out, d_lse = kernels.decode_attention_multi(q[:, :, 0], (store,), 0.2, scores=scores, score_offsets=(0,))
        mass = kernels.add_score_mass(torch.zeros(2, 1, 40, device=q.device), scores, d_lse, store.kv_start)
    torch.testing.assert_close(d_out, out[:, :, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d_lse, lse[:, :, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 1), 4.0, device=q.device), atol=1e-4, rtol=1e-4)


def test_quantize_store_needs_a_tensor() -> None:
    with pytest.raises(ValueError, match="tensor arguments"):
        kernels.quantize_store(bits=8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_quantize_store_routes_to_the_chosen_implementation(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    quantize = pytest.importorskip("kvpress.kernels.quantize")
    calls = []
    monkeypatch.setattr(quantize, "quantize_store_reference", lambda *a, **k: calls.append(("reference", a, k)))
    monkeypatch.setattr(quantize, "quantize_store_triton", lambda *a, **k: calls.append(("triton", a, k)))
    x = torch.zeros(2)
    with kernels.use_backend(backend):
        kernels.quantize_store(x, bits=8)
    assert len(calls) == 1 and calls[0][0] == backend and calls[0][1][0] is x and calls[0][2] == {"bits": 8}


def test_host_launch_arithmetic_matches_triton() -> None:
    """The launchers' plain-Python cdiv / next_power_of_2 (triton's are constexpr functions, ~2 us per host call)."""
    triton = pytest.importorskip("triton")
    from kvpress.kernels.triton_compat import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
