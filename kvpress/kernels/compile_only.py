"""Compile (never launch) the Triton kernels for a GPU target on a machine without one: Triton's bundled ptxas
behind a stand-in driver. Used by the sm_90 compile test and eval/kernel_instruction_counts.py (static checks only).
Call it in a separate process without TRITON_INTERPRET: it replaces the active driver and JITFunction.run."""
from __future__ import annotations

import sys

HARNESS_UNAVAILABLE = 3  # exit status when this Triton's internals do not allow compile-only runs


def install_compile_only(arch: int = 90) -> list:
    """Make every kernel launch compile for `arch` and return; returns the list (kernel name, compiled kernel) it
    fills. Exits the process with HARNESS_UNAVAILABLE if the harness cannot be installed."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        class StandInDriver:  # what JITFunction.run asks the active driver for
            def get_current_target(self):
                return GPUTarget("cuda", arch, 32)

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

        driver.set_active(StandInDriver())
        real_run = JITFunction.run
        compiled: list = []

        def compile_only(self, *args, grid, warmup, **kwargs):
            kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
            compiled.append((self.fn.__name__, kernel))
            return kernel

        JITFunction.run = compile_only
    except Exception as err:  # noqa: BLE001 - any harness failure means "cannot check here"
        print(f"harness unavailable: {err!r}", file=sys.stderr)
        sys.exit(HARNESS_UNAVAILABLE)
    return compiled
