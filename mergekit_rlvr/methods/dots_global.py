"""``sparsify: global`` for DoTS (paper 000, Eq. 2 as written: the mask keeps
|tau_i| >= quantile_{1-p}(|tau|) over the whole task vector, one threshold per
model). Exact, streaming: a radix select on the IEEE bits of |tau|, 16 bits per
pass over the checkpoints, so memory stays bounded by the largest tensor plus two
65536-entry histograms per model."""

from __future__ import annotations

import math
from typing import Iterable, Sequence, Tuple

import torch

from mergekit_rlvr.methods.common import MergeInputError, task_vector
from mergekit_rlvr.methods.dots import DotsStats, keep_count

_DIGIT = 16  # bits resolved per streaming pass of the global radix select
_CHUNK = 1 << 22  # entries per histogram step


def _magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|tau| as its IEEE bits (int32 for float32, int64 for float64): for
    non-negative floats the integer order is the float order."""
    mags = tau.detach().reshape(-1).abs()
    return mags.view(torch.int32 if mags.dtype == torch.float32 else torch.int64)


class _GlobalSelect:
    """One model's exact rank-th smallest |tau| over all its tensors, 16 bits per
    streaming pass (2 passes for float32): each pass histograms the next digit of
    the entries that share the digits found so far, with their squares summed per
    digit, so the kept norm (|tau| >= threshold, ties kept) comes out too."""

    def __init__(self):
        self.width = None  # 32 or 64
        self.total = 0
        self.full_sq = 0.0
        self.rank = 0
        self.prefix = 0
        self.level = 0
        self.kept_sq = 0.0
        self.threshold = None

    def start(self, density: float, squares: torch.Tensor) -> None:
        """After the first pass: the rank to find (or the answer, at the edges)."""
        self.full_sq = float(squares.sum())
        k = keep_count(self.total, density)
        if k <= 0:
            self.threshold, self.kept_sq = math.inf, 0.0
        elif k >= self.total:
            self.threshold, self.kept_sq = -math.inf, self.full_sq
        else:
            self.rank = self.total - k + 1

    @property
    def done(self) -> bool:
        return self.threshold is not None

    def observe(self, counts, squares, tau: torch.Tensor, first: bool) -> None:
        """Add one tensor's entries (those sharing the digits found so far) to this
        pass's histograms of the next digit: counts and summed squares (float64)."""
        bits = _magnitude_bits(tau)
        width = 32 if bits.dtype == torch.int32 else 64
        if self.width is None:
            self.width = width
        elif width != self.width:
            raise MergeInputError("sparsify: global needs one merge dtype for every tensor (float32 and float64 mixed)")
        if first:
            self.total += bits.numel()
        shift = width - _DIGIT * (self.level + 1)
        flat = tau.detach().reshape(-1)
        for start in range(0, bits.numel(), _CHUNK):  # bounded float64 temporaries
            chunk, values = bits[start:start + _CHUNK], flat[start:start + _CHUNK]
            if self.level:
                same = (chunk >> (shift + _DIGIT)) == self.prefix
                chunk, values = chunk[same], values[same]
            digit = ((chunk >> shift) & ((1 << _DIGIT) - 1)).long()
            wide = values.double()
            counts += torch.bincount(digit, minlength=1 << _DIGIT)
            squares += torch.bincount(digit, weights=wide * wide, minlength=1 << _DIGIT)

    def finish_pass(self, counts: torch.Tensor, squares: torch.Tensor) -> None:
        cumulative = counts.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(self.rank, dtype=cumulative.dtype)))
        self.rank -= int(cumulative[digit - 1]) if digit else 0
        self.prefix = (self.prefix << _DIGIT) | digit
        self.level += 1
        if _DIGIT * self.level < self.width:
            self.kept_sq += float(squares[digit + 1:].sum())
            return
        self.kept_sq += float(squares[digit:].sum())  # ties at the threshold are kept
        dtype = torch.int32 if self.width == 32 else torch.int64
        as_float = torch.float32 if self.width == 32 else torch.float64
        self.threshold = float(torch.tensor([self.prefix], dtype=torch.int64).to(dtype).view(as_float))


def dots_global_stats(
    passes: Iterable[Tuple[str, torch.Tensor, Sequence[torch.Tensor]]],
    densities: Sequence[float],
) -> DotsStats:
    """Per model, the exact k-th largest |tau| over every tensor, k = int(density * n)
    with n the model's entry count (ties at it are kept, as per tensor), and the
    global norms of Eq. 3 for that mask.

    ``passes`` is iterated once per 16 bits of the merge dtype (2 times for float32,
    4 for float64), each time reading every tensor once, one at a time."""
    count = len(densities)
    selects = [_GlobalSelect() for _ in range(count)]
    first = True
    while first or not all(s.done for s in selects):
        hist = [(torch.zeros(1 << _DIGIT, dtype=torch.int64), torch.zeros(1 << _DIGIT, dtype=torch.float64))
                for _ in range(count)]
        for _name, base, models in passes:
            for select, (counts, squares), model in zip(selects, hist, models):
                if not select.done:
                    select.observe(counts, squares, task_vector(model, base), first)
        for select, (counts, squares), density in zip(selects, hist, densities):
            if first:
                select.start(density, squares)
            if not select.done:
                select.finish_pass(counts, squares)
        first = False
    return DotsStats([{} for _ in range(count)], [s.full_sq for s in selects], [s.kept_sq for s in selects],
                     [s.threshold for s in selects])
