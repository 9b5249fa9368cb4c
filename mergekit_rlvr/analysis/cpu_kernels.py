"""The native CPU kernels of ``mergekit-rlvr analyze`` (``cpu_kernels.c``, built by
:mod:`mergekit_rlvr.native`).

One C loop per chunk and pass reads the stored bf16/f16/f32 entries, computes the
same float32 values as the torch kernels of :mod:`.kernels` (Delta, |Delta|, the
updated / changed / opposite-sign tests, the pass 3 threshold compares) and
increments the histograms in place: no float32 copies of the chunk, no key tensors.
Sums accumulate in double, so norms, dots and cosines differ from the torch
kernels' float32 reductions in the last digits only; every count, histogram and
threshold is the same (tests/analysis/test_cpu_kernels.py checks both on edge cases).

A chunk is split over ``torch.get_num_threads()`` threads (ctypes lets go of the GIL),
each with its own histograms (kept for a whole pass, added up by :meth:`flush`) and
sums. A chunk holding another dtype (float64, float8) runs the torch kernels.
``MERGEKIT_RLVR_NATIVE=0`` turns these kernels off (the torch kernels run on CPU too).
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
BLOCK = 1024  # entries per block of cpu_kernels.c
_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_c_p = ctypes.c_void_p


class _Args(ctypes.Structure):  # an_args of cpu_kernels.c
    _fields_ = [("n", ctypes.c_int64), ("nm", ctypes.c_int32), ("base_dtype", ctypes.c_int32), ("base", _c_p),
                ("models", ctypes.POINTER(_c_p)), ("dtypes", ctypes.POINTER(ctypes.c_int32)),
                ("epsilon", ctypes.c_float), ("eta", ctypes.c_float),
                ("nints", ctypes.c_int32), ("nsums", ctypes.c_int32), ("tables", ctypes.POINTER(_c_p)),
                ("hists", ctypes.POINTER(_c_p)), ("ints", _c_p), ("sums", _c_p), ("values", ctypes.POINTER(_c_p)),
                ("weights", ctypes.POINTER(_c_p)), ("ndistinct", ctypes.POINTER(ctypes.c_int32)),
                ("always", ctypes.POINTER(ctypes.c_int32)), ("nvalues", ctypes.POINTER(ctypes.c_int32)), ("top_slots", ctypes.POINTER(ctypes.c_int32)),
                ("dump", ctypes.c_int64), ("sizes", ctypes.POINTER(ctypes.c_int64))]


def enabled() -> bool:
    """MERGEKIT_RLVR_NATIVE: 1 / auto (default: use the native kernels on CPU), 0 (never)."""
    return os.environ.get("MERGEKIT_RLVR_NATIVE", "auto") != "0"


def library() -> Optional[ctypes.CDLL]:
    from mergekit_rlvr import native

    return native.load(SOURCE, ("an_pass1", "an_keys", "an_pass3"), "analyze: native CPU kernels",
                       "running the torch kernels")


def _array(ctype, values):
    return (ctype * max(len(values), 1))(*values)


def _pointers(tensors) -> ctypes.Array:
    return _array(_c_p, [None if t is None else t.data_ptr() for t in tensors])


def _distinct(values: torch.Tensor):
    """(distinct finite thresholds, how often each occurs (int32), how many are -inf):
    the pass 3 count of thresholds t <= |Delta| with one compare per distinct value."""
    finite = values[torch.isfinite(values)].cpu()
    unique, repeats = torch.unique(finite, return_counts=True)
    return unique.to(torch.float32).contiguous(), repeats.to(torch.int32).contiguous(), int((values == -math.inf).sum())


class CpuKernels:
    """The pass kernels of :class:`.backend.TorchKernels`, natively on CPU tensors, in
    ``threads`` threads of its own (``own_threads``: torch may run single-threaded meanwhile)."""

    own_threads = True

    def __init__(self, lib: ctypes.CDLL, threads: Optional[int] = None):
        from mergekit_rlvr.analysis.backend import TorchKernels

        self.lib = lib
        self.threads = max(1, threads or torch.get_num_threads())
        self.pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="analyze-native")
        self.copies: Dict[int, tuple] = {}  # per-thread histograms of this pass, by target
        self.torch = TorchKernels(False, "cpu", self.threads)  # float64 / float8 chunks

    def _native(self, ms: Sequence[torch.Tensor], b: torch.Tensor) -> bool:
        return all(t.dtype in _DTYPES for t in (b, *ms))

    def _args(self, ms, b, nints: int, nsums: int, threads: int):
        ms = [m.contiguous() for m in ms]
        b = b.contiguous()
        keep = [ms, b]
        a = _Args(n=b.numel(), nm=len(ms), base_dtype=_DTYPES[b.dtype], base=b.data_ptr(), models=_pointers(ms),
                  dtypes=_array(ctypes.c_int32, [_DTYPES[m.dtype] for m in ms]), nints=nints, nsums=nsums)
        ints = torch.zeros(threads, max(nints, 1), dtype=torch.int64)
        sums = torch.zeros(threads, max(nsums, 1), dtype=torch.float64)
        a.ints, a.sums = ints.data_ptr(), sums.data_ptr()
        return a, ints, sums, keep

    def _hists(self, targets: Sequence[Optional[torch.Tensor]], threads: int, spare: int = 0) -> ctypes.Array:
        """[t * len(targets) + k]: thread 0 counts into the target, the others into copies
        (all threads into copies with ``spare`` counters after the histogram)."""
        rows = []
        for t in range(threads):
            row = []
            for target in targets:
                if target is None or (t == 0 and not spare):
                    row.append(target)
                    continue
                entry = self.copies.setdefault(target.data_ptr(), (target, []))
                while len(entry[1]) < t + (1 if spare else 0):
                    entry[1].append(torch.zeros(target.numel() + spare, dtype=target.dtype))
                row.append(entry[1][t - (0 if spare else 1)])
            rows.append(row)
        return _pointers([h for row in rows for h in row])

    def _run(self, fn, a: _Args, threads: int) -> None:
        blocks = (a.n + BLOCK - 1) // BLOCK
        if threads <= 1:
            fn(ctypes.byref(a), 0, 0, blocks)
            return
        edges = [blocks * i // threads for i in range(threads + 1)]
        futures = [self.pool.submit(fn, ctypes.byref(a), t, edges[t], edges[t + 1]) for t in range(threads)]
        for future in futures:
            future.result()

    def _split(self, n: int) -> int:
        """Threads for a chunk of n entries: one per 64 Ki entries at most."""
        return max(1, min(self.threads, n >> 16))

    def flush(self) -> None:
        """Add the per-thread histograms of the pass into their targets."""
        for target, copies in self.copies.values():
            for copy in copies:
                target += copy[:target.numel()]
        self.copies.clear()

    def sample(self, ms, b, counts: List[torch.Tensor]) -> None:
        """counts[k] = the coarse histogram of model k's |Delta| on this chunk."""
        for c in counts:
            c.zero_()
        if not self._native(ms, b):
            return self.torch.sample(ms, b, counts)
        a, _, _, keep = self._args(ms, b, 0, 0, 1)
        a.tables, a.hists = None, _pointers(counts)
        self._run(self.lib.an_keys, a, 1)
        del keep

    def pass1(self, ms, b, hists, tables, refined, epsilon: float, eta: float):
        if not self._native(ms, b):
            return self.torch.pass1(ms, b, hists, tables, refined, epsilon, eta)
        nm, npairs = len(ms), len(ms) * (len(ms) - 1) // 2
        threads = self._split(b.numel())
        a, ints, sums, keep = self._args(ms, b, 2 * nm + 3 * npairs, nm + 5 * npairs, threads)
        a.epsilon, a.eta = epsilon, eta
        a.tables, a.hists = _pointers(tables), self._hists(hists, threads, spare=8)
        a.sizes = _array(ctypes.c_int64, [h.numel() for h in hists])
        self._run(self.lib.an_pass1, a, threads)
        del keep
        i, s = ints.sum(0).tolist(), sums.sum(0).tolist()
        per_model = [(math.sqrt(s[k]), i[2 * k], i[2 * k + 1]) for k in range(nm)]
        per_pair = []
        for p in range(npairs):
            c, f = i[2 * nm + 3 * p:2 * nm + 3 * p + 3], s[nm + 5 * p:nm + 5 * p + 5]
            per_pair.append((f[0], c[0], c[1], c[2], math.sqrt(f[1]), f[2], f[3], f[4]))
        return per_model, per_pair

    def pass2(self, ms, b, hists, tables, dump: int) -> None:
        if not self._native(ms, b):
            return self.torch.pass2(ms, b, hists, tables, dump)
        threads = self._split(b.numel())
        a, _, _, keep = self._args(ms, b, 0, 0, threads)
        a.tables, a.hists, a.dump = _pointers(tables), self._hists(hists, threads), dump
        self._run(self.lib.an_keys, a, threads)
        del keep

    def pass3(self, ms, b, values, top_slots, epsilon: float, hists) -> List[int]:
        if not self._native(ms, b) or max(v.numel() for v in values) >= 255:
            return self.torch.pass3(ms, b, values, top_slots, epsilon, hists)
        threads = self._split(b.numel())
        a, ints, _, keep = self._args(ms, b, len(ms), 0, threads)
        distinct = [_distinct(v) for v in values]
        a.epsilon = epsilon
        a.values, a.weights = _pointers([d[0] for d in distinct]), _pointers([d[1] for d in distinct])
        a.ndistinct = _array(ctypes.c_int32, [d[0].numel() for d in distinct])
        a.always = _array(ctypes.c_int32, [d[2] for d in distinct])
        a.nvalues = _array(ctypes.c_int32, [v.numel() for v in values])
        a.top_slots, a.hists = _array(ctypes.c_int32, list(top_slots)), self._hists(hists, threads)
        self._run(self.lib.an_pass3, a, threads)
        del keep, distinct
        return ints.sum(0).tolist()[:len(ms)]

    def close(self) -> None:
        self.torch.close()
        if self.pool is not None:
            self.pool.shutdown()
