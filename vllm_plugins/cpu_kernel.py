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
the CPU's features), with OpenMP where the compiler has it: a swap's threads are then
those of torch's own OpenMP pool (the libgomp.so.1 torch loaded), which right after a torch
op are still spinning on the cores (own threads had to wait for them: at two threads
the swap took longer than at one). ``MERGEKIT_RLVR_SWAP_KERNEL``: ``auto`` or ``1`` (default: every CPU
tensor), ``0`` (never: torch's index ops, which are also what CUDA tensors use), ``portable``
(the C loop without its AVX2 part, as on CPUs without AVX2: for tests). Without a compiler, or where the
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
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}
BLOCK = 2048  # entries per block (swap_kernel.c's BLOCK)
SPLIT = 16  # a thread per 2^SPLIT touched entries at most
_lib = {}


def wanted(t: torch.Tensor, count: int) -> bool:
    mode = os.environ.get("MERGEKIT_RLVR_SWAP_KERNEL", "auto")  # (or "portable")
    if mode == "0" or t.device.type != "cpu" or count == 0:
        return False
    return _library() is not None


def _library() -> Optional[ctypes.CDLL]:
    if "lib" not in _lib:
        from mergekit_rlvr import native

        lib = native.load(SOURCE, ("swap_combine", "swap_scatter", "swap_starts", "swap_init", "swap_apply_all"),
                          "hot-swap: CPU swap kernel", "using torch index ops", optional=("-fopenmp",))
        if lib is not None:
            lib.swap_init()
        _lib["lib"] = lib
    return _lib["lib"]


def fused(merge: torch.dtype, via: Optional[torch.dtype], out: torch.dtype) -> bool:
    """Whether swap_apply rounds as ``merged.to(via).to(out)`` does: a single cast
    (merge dtype -> out dtype) from the float32 or float64 sum, or none."""
    chain = [d for d in (merge, via, out) if d is not None]
    chain = [d for k, d in enumerate(chain) if k == 0 or d != chain[k - 1]]
    return all(d in _DTYPES for d in chain) and (len(chain) == 1 or (len(chain) == 2 and merge == torch.float32))


def _ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _array(ctype, values):
    return (ctype * max(len(values), 1))(*values)


def _starts(bits: torch.Tensor, count: int) -> torch.Tensor:
    starts = torch.empty((count + BLOCK - 1) // BLOCK + 1, dtype=torch.int64)
    _library().swap_starts(_ptr(bits), ctypes.c_int64(count), _ptr(starts))
    return starts


def _portable() -> int:
    return int(os.environ.get("MERGEKIT_RLVR_SWAP_KERNEL") == "portable")


def _threads(count: int) -> int:
    """How many threads share ``count`` touched entries: torch's intra-op count, one per 2^SPLIT at most."""
    return max(1, min(torch.get_num_threads(), count >> SPLIT))


def _run(fn, blocks: int, threads: int, *args) -> None:
    """fn(*args, first, last) over ``blocks`` blocks, split over ``threads`` threads
    (ctypes lets go of the GIL while C runs)."""
    threads = min(threads, blocks)
    if threads <= 1:
        fn(*args, ctypes.c_int64(0), ctypes.c_int64(blocks))
        return
    from concurrent.futures import ThreadPoolExecutor

    if _lib.get("pool_size", 0) < threads - 1:
        if _lib.get("pool") is not None:
            _lib["pool"].shutdown(wait=False)
        _lib["pool"] = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="hot-swap")
        _lib["pool_size"] = threads - 1
    edges = [blocks * i // threads for i in range(threads + 1)]
    futures = [_lib["pool"].submit(fn, *args, ctypes.c_int64(a), ctypes.c_int64(b)) for a, b in zip(edges[1:], edges[2:])]
    fn(*args, ctypes.c_int64(0), ctypes.c_int64(edges[1]))  # the first part here
    for future in futures:
        future.result()


class _Task(ctypes.Structure):
    """``struct task`` of swap_kernel.c: one tensor's swap."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "touched", "tstarts", "base", "out", "bits", "starts", "values", "vdt", "recompute", "has_scale", "nvalues",
        "scale", "coef")] + [("numel", ctypes.c_int64), ("count", ctypes.c_int64)] + [
        (name, ctypes.c_int) for name in ("bdt", "odt", "work64", "portable", "nvec")]


class _Prepared:
    """swap_apply's arguments for one packed tensor and output dtype, built once: a
    swap only sets the coefficients and the output's address."""

    def __init__(self, p, out_dtype: torch.dtype, portable: int):
        vectors = [(j, v) for j, v in enumerate(p.vectors) if v.values.numel()]
        self.slots = [j for j, _ in vectors]
        self.keep = [p.touched, p.starts, p.base] + [t for _, v in vectors for t in (v.bits, v.starts, v.values)]
        self.coef = _array(ctypes.c_double, [0.0] * len(vectors))
        self.arrays = [
            _array(ctypes.c_void_p, [None if v.bits is None else v.bits.data_ptr() for _, v in vectors]),
            _array(ctypes.c_void_p, [None if v.starts is None else v.starts.data_ptr() for _, v in vectors]),
            _array(ctypes.c_void_p, [v.values.data_ptr() for _, v in vectors]),
            _array(ctypes.c_int, [_DTYPES[v.values.dtype] for _, v in vectors]),
            _array(ctypes.c_int, [int(v.recompute) for _, v in vectors]),
            _array(ctypes.c_int, [int(v.scale is not None) for _, v in vectors]),
            _array(ctypes.c_int64, [v.values.numel() for _, v in vectors]),
            _array(ctypes.c_double, [1.0 if v.scale is None else float(v.scale) for _, v in vectors]), self.coef]
        addresses = [ctypes.addressof(a) for a in self.arrays]
        self.task = _Task(_ptr(p.touched), _ptr(p.starts), _ptr(p.base), None, *addresses, p.numel, p.count,
                          _DTYPES[p.base.dtype], _DTYPES[out_dtype], int(p.dtype == torch.float64), portable,
                          len(vectors))
        self.blocks, self.count = (p.numel + BLOCK - 1) // BLOCK, p.count

    def set(self, coefficients: Sequence[float], flat: torch.Tensor) -> None:
        for k, j in enumerate(self.slots):
            self.coef[k] = float(coefficients[j])
        self.task.out = flat.data_ptr()

    def run(self, coefficients: Sequence[float], flat: torch.Tensor) -> None:
        self.set(coefficients, flat)
        _apply_all([self])


def _prepared(p, flat: torch.Tensor, via: Optional[torch.dtype]):
    """swap_apply's arguments for ``p`` into ``flat`` (kept on ``p``: built at the first
    swap), or False where this kernel does not do it (not a CPU tensor, no library,
    dtypes that are not :func:`fused`, MERGEKIT_RLVR_SWAP_KERNEL=0)."""
    mode = os.environ.get("MERGEKIT_RLVR_SWAP_KERNEL", "auto")
    key = (flat.dtype, via, mode)
    prepared = p.kernel.get(key)
    if prepared is None:
        if mode == "0" or flat.device.type != "cpu" or not fused(p.dtype, via, flat.dtype) or _library() is None:
            prepared = p.kernel[key] = False
        else:
            tensors = [p.touched, p.starts, p.base] + [t for v in p.vectors for t in (v.bits, v.starts, v.values)]
            if not all(t is None or (t.is_contiguous() and t.device.type == "cpu") for t in tensors):
                raise ValueError("cpu_kernel.apply: packed tensors must be contiguous CPU tensors")
            if any(v.bits is not None and v.starts is None for v in p.vectors) or (p.touched is None) != (p.starts is None):
                raise ValueError("cpu_kernel.apply: packed storage without block starts (build it with packed.pack)")
            prepared = p.kernel[key] = _Prepared(p, flat.dtype, int(mode == "portable"))
    return prepared


def apply(p, coefficients: Sequence[float], flat: torch.Tensor, via: Optional[torch.dtype] = None) -> bool:
    """``packed.apply(p, coefficients, flat, via)`` (``flat``: 1-D, contiguous,
    ``p.numel`` entries), bit for bit, where this kernel does it: whether it did."""
    prepared = _prepared(p, flat, via)
    if prepared:
        prepared.run(coefficients, flat)
    return bool(prepared)


def apply_all(items) -> list:
    """:func:`apply` on every (p, coefficients, flat, via) of ``items`` in one call (threads
    inside, each a run of blocks across the tensors); gives back the items it did not do."""
    done, rest = [], []
    for p, coefficients, flat, via in items:
        prepared = _prepared(p, flat, via) if p.count else None
        if prepared:
            prepared.set(coefficients, flat)
            done.append(prepared)
        elif prepared is False:
            rest.append((p, coefficients, flat, via))
    if done:
        _apply_all(done)
    return rest


def _apply_all(done: Sequence[_Prepared]) -> None:
    """One swap_apply_all call (threads in the process's OpenMP pool) over prepared tasks."""
    edges = [0]
    for prepared in done:
        edges.append(edges[-1] + prepared.blocks)
    tasks = _array(ctypes.c_void_p, [ctypes.addressof(prepared.task) for prepared in done])
    threads = _threads(sum(prepared.count for prepared in done))
    _library().swap_apply_all(tasks, _array(ctypes.c_int64, edges), ctypes.c_int(len(done)), ctypes.c_int(threads))


def combine(p, coefficients: Sequence[float]) -> torch.Tensor:
    """``packed.combine_packed(p, coefficients)`` (1-D, ``p.dtype``), bit for bit: the
    compact merged values (the block starts of the touched entries found on the way)."""
    lib = _library()
    base = p.base.contiguous()
    vectors = [(v, float(c)) for v, c in zip(p.vectors, coefficients) if v.values.numel()]
    keep = [(v.bits.contiguous() if v.bits is not None else None, v.values.contiguous()) for v, _ in vectors]
    out = torch.empty(p.count, dtype=p.dtype)
    blocks = (p.count + BLOCK - 1) // BLOCK
    starts = torch.zeros(max(len(vectors), 1), blocks + 1, dtype=torch.int64)
    for j, (bits, _) in enumerate(keep):
        if bits is not None:
            starts[j] = _starts(bits, p.count)
    _run(lib.swap_combine, blocks, _threads(p.count),
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
         ctypes.c_int(int(p.dtype == torch.float64)), ctypes.c_int(_portable()), _ptr(starts))
    return out


def scatter(touched: torch.Tensor, merged: torch.Tensor, flat: torch.Tensor,
            starts: Optional[torch.Tensor] = None) -> None:
    """``flat`` (1-D, contiguous) with ``merged`` (its dtype) at the set bits of ``touched``;
    ``starts``: their block starts where already known (``packed.Packed.starts``)."""
    lib = _library()
    merged, touched = merged.contiguous(), touched.contiguous()
    starts = _starts(touched, flat.numel()) if starts is None else starts.contiguous()
    _run(lib.swap_scatter, len(starts) - 1, _threads(flat.numel()), ctypes.c_int64(flat.numel()), _ptr(touched), _ptr(merged), _ptr(flat),
         ctypes.c_int(flat.element_size()), _ptr(starts))
