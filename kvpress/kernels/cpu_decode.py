"""The compiled CPU decode kernel (cpu_decode.c): built once per machine with the host's C compiler, loaded with
ctypes, called per quantized store with per-token groups. Its oracle is the torch twin (reference.py); which stores
it takes is `takes(store)`, the rest stay with the twin (kernels/cpu_dispatch.py joins them).

Why C and not torch.compile: the same loop costs ~20 s of compilation in every fresh process with inductor
(eval/results/cpu_compiled_decode_probe.json); this source needs no torch headers and builds in about two seconds, once,
into the kvpress cache directory. Without a C compiler the twin runs, and a warning says so once.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from kvpress.kernels.reference import is_plain
from kvpress.kernels.store import KVStore, row_bounds

SOURCE = Path(__file__).with_name("cpu_decode.c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-std=gnu11", "-fopenmp")
MAX_ROWS, HEAD_DIMS, MAX_GROUPS, LANES, MAX_PLAIN = 64, (64, 128), 32, 8, 4  # cpu_decode.c's limits
PLAIN_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # kvp_segment.dtype


def build_dir() -> Path:
    """Where the built library lives: $KVPRESS_CACHE_DIR/kernels or ~/.cache/kvpress/kernels."""
    return Path(os.environ.get("KVPRESS_CACHE_DIR", Path.home() / ".cache" / "kvpress")) / "kernels"


def _compiler() -> str | None:
    """The C compiler to build with: cc, else gcc (None: neither is on PATH)."""
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and flags (a library built on another CPU is not reused)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _library_path(compiler: str) -> Path:
    """The library's file name: a hash of the source, the flags, the compiler's version and the CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_signature()]).encode()).hexdigest()
    return build_dir() / f"cpu_decode-{key[:16]}.so"


def build(compiler: str | None = None) -> Path:
    """Compile cpu_decode.c unless this machine's library is already built; return its path. Raises RuntimeError
    with the compiler's message when the build fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    path = _library_path(compiler)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}:\n{result.stderr.strip()}")
        os.replace(built, path)  # atomic: concurrent builders leave one complete file
    return path


class _Field(ctypes.Structure):
    """kvp_field in cpu_decode.c."""

    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("codes_strides", ctypes.c_int64 * 3), ("scale_strides", ctypes.c_int64 * 3),
                ("bits", ctypes.c_int64), ("group", ctypes.c_int64), ("block", ctypes.c_int64)]


class _Store(ctypes.Structure):
    """kvp_store in cpu_decode.c."""

    _fields_ = [("k", _Field), ("v", _Field), ("table", ctypes.c_void_p), ("table_stride", ctypes.c_int64),
                ("page_size", ctypes.c_int64), ("pages", ctypes.c_int64), ("start", ctypes.c_void_p),
                ("end", ctypes.c_void_p), ("start_all", ctypes.c_int64), ("end_all", ctypes.c_int64)]


class _Segment(ctypes.Structure):
    """kvp_segment in cpu_decode.c."""

    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("k_strides", ctypes.c_int64 * 3),
                ("v_strides", ctypes.c_int64 * 3), ("dtype", ctypes.c_int64), ("table", ctypes.c_void_p),
                ("table_stride", ctypes.c_int64), ("page_size", ctypes.c_int64), ("pages", ctypes.c_int64),
                ("start", ctypes.c_int64), ("end", ctypes.c_int64), ("score_offset", ctypes.c_int64)]


class _Plain(ctypes.Structure):
    """kvp_plain in cpu_decode.c."""

    _fields_ = [("segments", _Segment * MAX_PLAIN), ("count", ctypes.c_int64), ("q", ctypes.c_void_p),
                ("out", ctypes.c_void_p)]


class _Call(ctypes.Structure):
    """kvp_call in cpu_decode.c."""

    _fields_ = [("q", ctypes.c_void_p), ("batch", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("rows", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("col0", ctypes.c_int64),
                ("width", ctypes.c_int64), ("scratch", ctypes.c_void_p), ("scores", ctypes.c_void_p),
                ("scores_strides", ctypes.c_int64 * 2), ("score_offset", ctypes.c_int64), ("out", ctypes.c_void_p),
                ("lse", ctypes.c_void_p),
                ("threads", ctypes.c_int64)]


_WARNED = threading.Event()


@lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    """The built library, or None (with one warning naming why) when it cannot be built here."""
    try:
        library = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as error:
        if not _WARNED.is_set():
            _WARNED.set()
            warnings.warn(f"kvpress: the compiled CPU decode kernel is unavailable ({error}); decoding over a "
                          "quantized cache on the CPU uses the slower torch path. Install a C compiler (gcc) to "
                          "enable it.", RuntimeWarning, stacklevel=3)
        return None
    library.kvp_decode.restype = ctypes.c_int
    library.kvp_decode.argtypes = [ctypes.POINTER(_Store), ctypes.POINTER(_Plain), ctypes.POINTER(_Call)]
    return library


def available() -> bool:
    """True when the compiled kernel is built (or can be) on this machine."""
    return _load() is not None


def _field_fits(codes: torch.Tensor, scale: torch.Tensor | None, bits: int, head_dim: int) -> bool:
    """A quantized field the kernel reads: uint8 codes and fp16 scales with unit column stride, groups of whole
    8-float vectors, each part of a byte a whole number of vectors."""
    if bits not in (2, 4, 8) or scale is None or scale.dtype != torch.float16:
        return False
    groups = scale.shape[-1]
    group = head_dim // groups
    return (codes.stride(-1) == 1 and scale.stride(-1) == 1 and groups <= MAX_GROUPS and group % LANES == 0
            and (head_dim * bits // 8) % LANES == 0)


def _channel_keys_fit(store: KVStore) -> bool:
    """Keys per channel (k_block) the kernel reads: one page per row, each block's D scales contiguous over its slots
    (slot layout with unit column stride), and each part of a byte a whole number of 8-float vectors."""
    scale = store.k_scale
    return (store.block_table.shape[1] == 1 and scale is not None and scale.dtype == torch.float16
            and store.k_zero.stride() == scale.stride() and scale.stride(-1) == 1
            and scale.stride(2) == scale.shape[-1] and store.k_bits in (2, 4, 8) and store.k.stride(-1) == 1
            and store.k.shape[-1] % LANES == 0)  # (bytes per token = elements per part: whole vectors)


def takes(store: KVStore, rows: int, head_dim: int) -> bool:
    """Whether the compiled kernel reads this store (decode, `rows` query rows per kv head): both fields quantized
    (keys per token or per channel), not causal, on the CPU, within the kernel's limits. Rotations are handled
    around it."""
    if store.k.device.type != "cpu" or store.causal or rows > MAX_ROWS or head_dim not in HEAD_DIMS:
        return False
    keys_fit = (_channel_keys_fit(store) if store.k_block is not None
                else _field_fits(store.k, store.k_scale, store.k_bits, head_dim)
                and store.k_zero.stride() == store.k_scale.stride())
    return (keys_fit and _field_fits(store.v, store.v_scale, store.v_bits, head_dim)
            and store.v_zero.stride() == store.v_scale.stride())


def _field(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, head_dim: int,
           block: int | None = None) -> _Field:
    """kvp_field of one stored field (the tensors must outlive the call); `block`: keys per channel."""
    group = head_dim if block else head_dim // scale.shape[-1]
    return _Field(codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), (ctypes.c_int64 * 3)(*codes.stride()[:3]),
                  (ctypes.c_int64 * 3)(*scale.stride()[:3]), bits, group, block or 0)


@dataclass
class _Bounds:
    """A store's row bounds as the kernel reads them: (B,) int32 tensors, or None and one int span for every row;
    col0 / width: the columns of the logits scratch that cover every row's tokens."""

    start: torch.Tensor | None
    end: torch.Tensor | None
    start_all: int
    end_all: int
    col0: int
    width: int


def _bounds(store: KVStore, batch: int) -> _Bounds:
    """The store's bounds, checked against the tokens its table can address (the kernel checks each table entry
    against the pool as it reads it)."""
    start, end = store.kv_start, store.kv_end
    if isinstance(start, int) and isinstance(end, int):
        begin = min(start, end)
        bounds = _Bounds(None, None, begin, end, begin, end - begin)
    else:  # per-row bounds, starts clamped into [0, end] (store.row_bounds)
        start_t, end_t = (t.contiguous() for t in row_bounds(store, batch, store.k.device))
        top = int(end_t.max()) if batch else 0
        col0 = min(int(start_t.min()), top) if batch else 0
        bounds = _Bounds(start_t, end_t, 0, 0, col0, top - col0)
    if bounds.col0 + bounds.width > store.capacity:
        raise ValueError(f"need kv_end <= max_pages * page_size = {store.capacity}; got {bounds.col0 + bounds.width}")
    return bounds


def joins(store: KVStore, head_dim: int) -> bool:
    """Whether a 16-bit store can join the kernel's softmax as a plain segment: reference.is_plain (every row attends
    the same int span, unrotated, not causal), float32 / float16 / bfloat16 with contiguous columns, an int32
    table."""
    return (is_plain(store) and store.k.dtype in PLAIN_DTYPES and store.v.dtype == store.k.dtype
            and store.k.device.type == "cpu" and store.k.stride(-1) == 1 and store.v.stride(-1) == 1 and head_dim in HEAD_DIMS
            and store.block_table.dtype == torch.int32 and store.block_table.stride(-1) == 1)


def _segment(store: KVStore, score_offset: int = 0) -> _Segment:
    """kvp_segment of a store `joins` accepts (its tensors must outlive the call)."""
    end = store.kv_end
    if end > store.capacity:
        raise ValueError(f"need kv_end <= max_pages * page_size = {store.capacity}; got {end}")
    table = store.block_table
    return _Segment(store.k.data_ptr(), store.v.data_ptr(), (ctypes.c_int64 * 3)(*store.k.stride()[:3]),
                    (ctypes.c_int64 * 3)(*store.v.stride()[:3]), PLAIN_DTYPES[store.k.dtype], table.data_ptr(),
                    table.stride(0), store.page_size, store.k.shape[0], min(max(store.kv_start, 0), end), end,
                    score_offset)


@dataclass
class Decoded:
    """What one call returns: out (B, Hkv, R, D) float32 (the codes' share alone when the plain stores' is apart),
    natural-log lse (B, Hkv, R) over every attended token, and the plain stores' share when asked apart."""

    out: torch.Tensor
    lse: torch.Tensor
    plain_out: torch.Tensor | None = None


_NO_TOKENS = _Bounds(None, None, 0, 0, 0, 0)


def _native_store(store: KVStore | None, bounds: _Bounds, head_dim: int) -> tuple[_Store, torch.Tensor | None]:
    """kvp_store of a codes store (and the int32 table it points to), or of none: no tokens, never read."""
    if store is None:
        empty = _Field(None, None, None, (ctypes.c_int64 * 3)(), (ctypes.c_int64 * 3)(), 8, head_dim, 0)
        return _Store(empty, empty, None, 0, 1, 0, None, None, 0, 0), None
    table = store.block_table.to(torch.int32).contiguous()
    return _Store(_field(store.k, store.k_scale, store.k_zero, store.k_bits, head_dim, store.k_block),
                  _field(store.v, store.v_scale, store.v_zero, store.v_bits, head_dim),
                  table.data_ptr(), table.stride(0), store.page_size, store.k.shape[0],
                  None if bounds.start is None else bounds.start.data_ptr(),
                  None if bounds.end is None else bounds.end.data_ptr(), bounds.start_all, bounds.end_all), table


def decode_store(q: torch.Tensor, store: KVStore | None, plain: tuple[KVStore, ...] = (),
                 plain_q: torch.Tensor | None = None, plain_apart: bool = False, scores: torch.Tensor | None = None,
                 score_offsets: tuple[int, ...] = ()) -> Decoded:
    """q (B, Hkv, R, D) float32, pre-scaled (and rotated into the store's key frame), over one store that `takes`
    accepts (or none) and up to MAX_PLAIN 16-bit stores that `joins` accepts, in one softmax. `plain_q`: the plain
    stores' queries when they differ (rotated codes); `plain_apart`: return their share of the output apart.
    `scores` (B, Hkv * R, L) float32 with unit column stride: each attended token t's log2-domain logit is written at
    column offset + t, score_offsets giving the codes store's offset (when there is one), then each plain store's;
    checked to fit."""
    library = _load()
    if library is None:
        raise RuntimeError("the compiled CPU decode kernel is unavailable (see the warning)")
    if len(plain) > MAX_PLAIN:
        raise ValueError(f"at most {MAX_PLAIN} plain stores join the kernel's softmax; got {len(plain)}")
    batch, heads, rows, head_dim = q.shape
    q = q.contiguous()
    bounds = _NO_TOKENS if store is None else _bounds(store, batch)
    col0, width = bounds.col0, bounds.width
    offsets = list(score_offsets) if scores is not None else [0] * (len(plain) + (store is not None))
    if scores is not None:
        spans = ([bounds.col0 + bounds.width] if store is not None else []) + [s.kv_end for s in plain]
        if len(offsets) != len(spans) or any(o + e > scores.shape[2] for o, e in zip(offsets, spans)):
            raise ValueError(f"scores has {scores.shape[2]} columns: too few for offsets {offsets} of stores ending "
                             f"at tokens {spans}")
    code_offset = offsets.pop(0) if store is not None else 0
    native, table = _native_store(store, bounds, head_dim)
    out, lse = torch.empty(batch, heads, rows, head_dim), torch.empty(batch, heads, rows)
    plain_q = None if plain_q is None else plain_q.contiguous()
    plain_out = torch.empty_like(out) if plain and plain_apart else None
    native_plain = _Plain((_Segment * MAX_PLAIN)(*map(_segment, plain, offsets)), len(plain),
                          None if plain_q is None else plain_q.data_ptr(),
                          None if plain_out is None else plain_out.data_ptr())
    length = sum(segment.end - segment.start for segment in native_plain.segments[: len(plain)])
    scratch = torch.empty(batch, heads, rows, width + length)
    strides = (0, 0) if scores is None else scores.stride()[:2]
    call = _Call(q.data_ptr(), batch, heads, rows, head_dim, col0, width, scratch.data_ptr(),
                 None if scores is None else scores.data_ptr(), (ctypes.c_int64 * 2)(*strides), code_offset,
                 out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    status = library.kvp_decode(ctypes.byref(native), ctypes.byref(native_plain), ctypes.byref(call))
    if status == -2:
        raise ValueError("a block_table names a page outside its store's pool for a token a row attends")
    if status != 0:
        raise ValueError("the compiled CPU decode kernel rejected this store's shapes (takes() should have)")
    return Decoded(out, lse, plain_out)
