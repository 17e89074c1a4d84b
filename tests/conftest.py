"""Test-wide settings: run Triton kernels in the interpreter on machines without CUDA."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before any module decorates a kernel with @triton.jit.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
