"""The swap's arithmetic on packed storage as one C loop per tensor, on CPU.

:mod:`vllm_plugins.packed` keeps bitmasks and compacted values; unpacking them with
torch's index ops (``nonzero``, ``index_select``, ``index_add_``, ``masked_scatter_``)
writes several int64/float32 temporaries per entry and reaches 1-2% of memcpy on CPU.
``swap_kernel.c`` walks the bitmasks once, in cache-sized blocks, and does the same
float32 (float64) operations as :func:`mergekit_rlvr.methods.common.combine`, built
with ``-ffp-contract=off`` and no fast-math, so the bits are the same (checked in
``tests/test_device_math.py`` on signed zeros, subnormals and ties).

It is compiled once per machine with the system C compiler (about a second; the
library is cached under ``~/.cache/mergekit-rlvr``, keyed by the source, the flags and
the CPU's features). ``MERGEKIT_RLVR_SWAP_KERNEL``: ``auto`` or ``1`` (default: every CPU
tensor), ``0`` (never: torch's index ops, which are also what CUDA tensors use). Without a compiler, or where the
build fails, one warning is logged and the index ops are used.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("swap_kernel.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}
_BLOCK = 2048
_lib = {}


def wanted(t: torch.Tensor, count: int) -> bool:
    mode = os.environ.get("MERGEKIT_RLVR_SWAP_KERNEL", "auto")
    if mode == "0" or t.device.type != "cpu" or count == 0:
        return False
    return _library() is not None


def _library() -> Optional[ctypes.CDLL]:
    if "lib" not in _lib:
        from mergekit_rlvr import native

        lib = native.load(SOURCE, ("swap_combine", "swap_scatter", "swap_starts", "swap_init"),
                          "hot-swap: CPU swap kernel", "using torch index ops", FLAGS)
        if lib is not None:
            lib.swap_init()
        _lib["lib"] = lib
    return _lib["lib"]


def _ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _array(ctype, values):
    return (ctype * max(len(values), 1))(*values)


def _starts(bits: torch.Tensor, count: int) -> torch.Tensor:
    starts = torch.empty((count + _BLOCK - 1) // _BLOCK + 1, dtype=torch.int64)
    _library().swap_starts(_ptr(bits), ctypes.c_int64(count), _ptr(starts))
    return starts


def _threads(count: int) -> int:
    """How many threads share one tensor: torch's intra-op count, one per 2^18 entries at most."""
    return max(1, min(torch.get_num_threads(), count >> 18))


def _run(fn, count: int, *args) -> None:
    """fn(*args, first, last) over the blocks of ``count`` entries, split over threads
    (ctypes lets go of the GIL while C runs)."""
    blocks = (count + _BLOCK - 1) // _BLOCK
    threads = min(_threads(count), blocks)
    if threads <= 1:
        fn(*args, ctypes.c_int64(0), ctypes.c_int64(blocks))
        return
    from concurrent.futures import ThreadPoolExecutor

    if _lib.get("pool_size", 0) < threads:
        if _lib.get("pool") is not None:
            _lib["pool"].shutdown(wait=False)
        _lib["pool"] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hot-swap")
        _lib["pool_size"] = threads
    edges = [blocks * i // threads for i in range(threads + 1)]
    futures = [_lib["pool"].submit(fn, *args, ctypes.c_int64(a), ctypes.c_int64(b)) for a, b in zip(edges, edges[1:])]
    for future in futures:
        future.result()


def combine(p, coefficients: Sequence[float]) -> torch.Tensor:
    """``packed.combine_packed(p, coefficients)`` (1-D, ``p.dtype``), bit for bit."""
    lib = _library()
    base = p.base.contiguous()
    vectors = [(v, float(c)) for v, c in zip(p.vectors, coefficients) if v.values.numel()]
    keep = [(v.bits.contiguous() if v.bits is not None else None, v.values.contiguous()) for v, _ in vectors]
    out = torch.empty(p.count, dtype=p.dtype)
    blocks = (p.count + _BLOCK - 1) // _BLOCK
    starts = torch.zeros(max(len(vectors), 1), blocks + 1, dtype=torch.int64)
    for j, (bits, _) in enumerate(keep):
        if bits is not None:
            starts[j] = _starts(bits, p.count)
    _run(lib.swap_combine, p.count,
         ctypes.c_int64(p.count), _ptr(base), ctypes.c_int(_DTYPES[base.dtype]), _ptr(out),
         ctypes.c_int(_DTYPES[p.dtype]), ctypes.c_int(len(vectors)),
         _array(ctypes.c_void_p, [b.data_ptr() if b is not None else None for b, _ in keep]),
         _array(ctypes.c_void_p, [values.data_ptr() for _, values in keep]),
         _array(ctypes.c_int, [_DTYPES[values.dtype] for _, values in keep]),
         _array(ctypes.c_int, [int(v.recompute) for v, _ in vectors]),
         _array(ctypes.c_int, [int(v.scale is not None) for v, _ in vectors]),
         _array(ctypes.c_double, [1.0 if v.scale is None else float(v.scale) for v, _ in vectors]),
         _array(ctypes.c_double, [c for _, c in vectors]),
         _array(ctypes.c_int64, [values.numel() for _, values in keep]),
         ctypes.c_int(int(p.dtype == torch.float64)), _ptr(starts))
    return out


def scatter(touched: torch.Tensor, merged: torch.Tensor, flat: torch.Tensor) -> None:
    """``flat`` (1-D, contiguous) with ``merged`` (its dtype) at the set bits of ``touched``."""
    lib = _library()
    merged, touched = merged.contiguous(), touched.contiguous()
    starts = _starts(touched, flat.numel())
    _run(lib.swap_scatter, flat.numel(), ctypes.c_int64(flat.numel()), _ptr(touched), _ptr(merged), _ptr(flat),
         ctypes.c_int(flat.element_size()), _ptr(starts))
