"""Import triton when it is there; otherwise a stand-in that lets kernel definitions parse (the *_triton functions
then raise through require_triton)."""
try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # keep the package importable without triton; the *_triton functions then raise

    class _TritonMissing:
        """Stand-in for `triton` / `triton.language` so kernel definitions still parse without triton."""

        def __getattr__(self, name: str) -> None:
            return None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _TritonMissing()
    HAS_TRITON = False


def require_triton() -> None:
    """Raise a clear error when a *_triton function is called without triton installed."""
    if not HAS_TRITON:
        raise ValueError("triton is not installed: use the *_reference kernels or set KVPRESS_KERNELS=reference")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch arithmetic on the host (triton.cdiv is a constexpr function: ~2 us per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (0 for n <= 0, like triton.next_power_of_2), for host launch arithmetic (cdiv)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
