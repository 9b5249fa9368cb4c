"""``sparsify: global`` for DoTS (paper 000, Eq. 2 as written: the mask keeps
|tau_i| >= quantile_{1-p}(|tau|) over the whole task vector, one threshold per
model). Exact, streaming: a radix select on the IEEE bits of |tau|, 16 bits per
pass over the checkpoints, so memory stays bounded by the largest tensor plus two
65536-entry histograms per model."""

from __future__ import annotations

import math
from typing import Iterable, List, Sequence, Tuple

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

    def observe(self, counts, squares, tau: torch.Tensor, first: bool) -> int:
        """Add one tensor's entries (those sharing the digits found so far) to this
        pass's histograms of the next digit: counts and summed squares (float64).
        Returns how many entries shared those digits (all of them in the first pass)."""
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
        seen = 0
        for start in range(0, bits.numel(), _CHUNK):  # bounded float64 temporaries
            chunk, values = bits[start:start + _CHUNK], flat[start:start + _CHUNK]
            if self.level:
                same = (chunk >> (shift + _DIGIT)) == self.prefix
                chunk, values = chunk[same], values[same]
            seen += chunk.numel()
            digit = ((chunk >> shift) & ((1 << _DIGIT) - 1)).long()
            wide = values.double()
            counts += torch.bincount(digit, minlength=1 << _DIGIT)
            squares += torch.bincount(digit, weights=wide * wide, minlength=1 << _DIGIT)
        return seen

    @property
    def resolving_last(self) -> bool:
        """Whether the pass now running resolves the last digit (the width is known
        from the first pass)."""
        return self.width is not None and _DIGIT * (self.level + 1) >= self.width

    @property
    def lower_bound(self) -> float:
        """In the pass that resolves the last digit: the smallest |tau| that shares the
        digits found so far (every entry kept is at least this, and an entry below it
        is dropped); the threshold itself once done."""
        if self.done:
            return self.threshold
        return _as_float(self.prefix << (self.width - _DIGIT * self.level), self.width)

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
        self.threshold = _as_float(self.prefix, self.width)


def _as_float(bits: int, width: int) -> float:
    """The non-negative float32 (width 32) or float64 whose IEEE bits are ``bits``."""
    dtype, as_float = (torch.int32, torch.float32) if width == 32 else (torch.int64, torch.float64)
    return float(torch.tensor([bits], dtype=torch.int64).to(dtype).view(as_float))


class GlobalSelection:
    """Every model's :class:`_GlobalSelect` driven one streamed tensor at a time:
    ``add`` each tensor of a pass, then ``next_pass()`` (False once every threshold is
    found). In the pass that resolves the last digit (``final``), :meth:`bounds` gives
    thresholds whose masks hold every entry the final ones keep, and :attr:`open` says
    whether the tensor just added has entries between the two (where it has none, its
    masks under ``bounds`` are the final ones): what the hot swap's driver sizes the
    swap with in that same read."""

    def __init__(self, densities: Sequence[float]):
        self.densities = list(densities)
        self.selects = [_GlobalSelect() for _ in self.densities]
        self.first = True
        self.open = False
        self._new_histograms()

    def _new_histograms(self) -> None:
        self.hist = [(torch.zeros(1 << _DIGIT, dtype=torch.int64), torch.zeros(1 << _DIGIT, dtype=torch.float64))
                     for _ in self.selects]

    @property
    def done(self) -> bool:
        return all(s.done for s in self.selects)

    @property
    def final(self) -> bool:
        """Whether this pass finds every threshold still open (never the first pass)."""
        return not self.first and all(s.done or s.resolving_last for s in self.selects)

    def add(self, name: str, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        self.open = False
        for select, (counts, squares), model in zip(self.selects, self.hist, models):
            if not select.done:
                shared = select.observe(counts, squares, task_vector(model, base), self.first)
                self.open |= bool(shared)

    def bounds(self) -> List[float]:
        return [s.lower_bound for s in self.selects]

    def next_pass(self) -> bool:
        """End this pass; whether another one is needed."""
        for select, (counts, squares), density in zip(self.selects, self.hist, self.densities):
            if self.first:
                select.start(density, squares)
            if not select.done:
                select.finish_pass(counts, squares)
        self.first = False
        self._new_histograms()
        return not self.done

    def stats(self) -> DotsStats:
        selects = self.selects
        return DotsStats([{} for _ in selects], [s.full_sq for s in selects], [s.kept_sq for s in selects],
                         [s.threshold for s in selects])


def dots_global_stats(
    passes: Iterable[Tuple[str, torch.Tensor, Sequence[torch.Tensor]]],
    densities: Sequence[float],
) -> DotsStats:
    """Per model, the exact k-th largest |tau| over every tensor, k = int(density * n)
    with n the model's entry count (ties at it are kept, as per tensor), and the
    global norms of Eq. 3 for that mask.

    ``passes`` is iterated once per 16 bits of the merge dtype (2 times for float32,
    4 for float64), each time reading every tensor once, one at a time."""
    selection = GlobalSelection(densities)
    more = True
    while more:
        for name, base, models in passes:
            selection.add(name, base, models)
        more = selection.next_pass()
    return selection.stats()
