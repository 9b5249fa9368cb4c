"""Exact global thresholds of |Delta| from histograms of its float32 bit patterns
(for non-negative floats the bit pattern orders like the value), with memory
independent of the model size.

A row sample read before pass 1 predicts the coarse bins (top 16 bits) that hold
each density's k-th largest |Delta|; pass 1 histograms the coarse bins everywhere
and all 32 bits inside the predicted ones (``MagnitudeHistogram``). A threshold
whose bin was predicted is then exact after pass 1; the others get a fine
histogram of their bin in a pass 2 (``FineHistograms``), which is skipped when the
prediction held for every threshold (the usual case). The prediction only decides
how much is read: the thresholds are exact either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_rlvr.analysis.kernels import COARSE_BINS, FINE_BINS
from mergekit_rlvr.methods.dots import keep_count


class MagnitudeHistogram:
    """Pass 1 histogram of one vector's |Delta| bit patterns: coarse (top 16 bits)
    everywhere, and fine (all 32 bits) inside ``refined`` coarse bins, the bins the
    pre-pass sample predicts to hold a threshold (``kernels.histogram_key``): when
    the prediction holds, pass 1 pins the thresholds exactly and pass 2 is skipped.
    ``counts`` is filled by :class:`Counting` from the keys of ``pass1_kernel``."""

    def __init__(self, refined: Sequence[int] = (), device="cpu", width: int = 0):
        self.bins = sorted(set(refined))
        table = torch.full((COARSE_BINS,), -1, dtype=torch.int32)
        for slot, coarse_bin in enumerate(self.bins):
            table[coarse_bin] = slot * FINE_BINS
        self.table = table.to(device)
        # padded with -1 to ``width`` (default MAX_REFINED): one size for every model of a
        # run, so one compiled kernel serves them all
        padded = self.bins + [-1] * (max(width or MAX_REFINED, len(self.bins)) - len(self.bins))
        self.refined = torch.tensor(padded, dtype=torch.int32, device=device)
        self.size = COARSE_BINS + len(self.bins) * FINE_BINS
        self.counts = torch.zeros(self.size, dtype=torch.int64, device=device)

    def fine(self, coarse_bin: int) -> Optional[torch.Tensor]:
        """The low-16-bit histogram of a refined bin (None if not refined)."""
        if coarse_bin not in self.bins:
            return None
        start = COARSE_BINS + self.bins.index(coarse_bin) * FINE_BINS
        return self.counts[start:start + FINE_BINS].cpu()

    def coarse(self) -> torch.Tensor:
        counts = self.counts.cpu()
        out = counts[:COARSE_BINS].clone()
        for slot, coarse_bin in enumerate(self.bins):
            out[coarse_bin] += counts[COARSE_BINS + slot * FINE_BINS:COARSE_BINS + (slot + 1) * FINE_BINS].sum()
        return out


#: at most this many coarse bins refined in pass 1 per vector (each costs 64 Ki counters)
MAX_REFINED = 16


def refined_width(counts: Sequence[int]) -> int:
    """The padded length of the refined-bin lists of a run: the longest rounded up to a
    multiple of 4 (at most 4 kernel variants; each padded slot costs a compare per entry)."""
    return max(4, -(-max(counts, default=0) // 4) * 4)


def count_into(counts: torch.Tensor, key: torch.Tensor) -> None:
    """counts[k] += #(key == k), in place: ``index_add_`` of a broadcast one (no
    histogram allocated, zeroed and added per chunk as with ``bincount``, and a
    tighter loop: ~4x faster on CPU; exact, integers)."""
    one = torch.ones((), dtype=counts.dtype, device=counts.device)
    counts.index_add_(0, key.reshape(-1), one.expand(key.numel()))


class Counting:
    """The histogram updates of a chunk, one ``count_into`` per (counts, key) job.
    ``index_add_`` is a serial loop on CPU, so there the jobs run in parallel threads
    (torch releases the GIL), a job split in pieces when there are fewer jobs than
    threads and its counts are small (each extra piece adds into its own zeroed copy).
    Integer counts: the result does not depend on the split. Elsewhere (CUDA) the jobs
    are queued in order."""

    SPLIT_UP_TO = 1 << 16  #: counters of a histogram that may be split

    def __init__(self, device, threads: Optional[int] = None):
        self.threads = max(1, threads or torch.get_num_threads()) if torch.device(device).type == "cpu" else 1
        self.pool = None
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="analyze-count")

    def __call__(self, jobs: Sequence[tuple]) -> None:
        if self.pool is None:
            for counts, key in jobs:
                count_into(counts, key)
            return
        pieces, merges = [], []
        for counts, key in jobs:
            split = self.threads // len(jobs) if counts.numel() <= self.SPLIT_UP_TO else 1
            parts = key.reshape(-1).chunk(max(1, split))
            pieces.append((counts, parts[0]))
            for part in parts[1:]:
                extra = torch.zeros_like(counts)
                pieces.append((extra, part))
                merges.append((counts, extra))
        list(self.pool.map(lambda job: count_into(*job), pieces))
        for counts, extra in merges:
            counts += extra

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def predict_bins(sampled: torch.Tensor, sampled_entries: int, parameters: int,
                 densities: Sequence[float]) -> List[int]:
    """The coarse bins likely to hold each density's threshold, from the weighted
    coarse histogram of a row sample of ``sampled_entries`` entries: the bins whose
    ranks meet k -/+ 8 standard errors of the sample's rank estimate (plus 1e-4 n) and
    that the sample saw, nearest first, at most ``MAX_REFINED``. Only speed depends on it."""
    from_top = sampled.to(torch.float64).flip(0).cumsum(0)
    total = float(from_top[-1]) if from_top.numel() else 0.0
    scale = parameters / total if total > 0 else 0.0
    picked: Dict[int, float] = {}
    seen = sampled > 0
    for density in densities:
        k = keep_count(parameters, density)
        if k <= 0 or k >= parameters or scale == 0.0:
            continue
        q = k / parameters
        spread = 8 * parameters * math.sqrt(q * (1 - q) / max(sampled_entries, 1)) + 1e-4 * parameters
        low = torch.tensor([(k - spread) / scale], dtype=torch.float64)
        high = torch.tensor([(k + spread) / scale], dtype=torch.float64)
        first = int(torch.searchsorted(from_top, low))
        last = int(torch.searchsorted(from_top, high))
        centre = int(torch.searchsorted(from_top, torch.tensor([k / scale], dtype=torch.float64)))
        positions = torch.arange(first, min(last, from_top.numel() - 1) + 1)
        bins = sampled.numel() - 1 - positions
        keep = seen[bins] | (positions == centre)  # bins the sample never saw are unlikely
        for position, bin_ in zip(positions[keep].tolist(), bins[keep].tolist()):
            picked[bin_] = min(picked.get(bin_, math.inf), abs(position - centre))
    return sorted(sorted(picked, key=lambda b: (picked[b], b))[:MAX_REFINED])


@dataclass(frozen=True)
class Boundary:
    """Where the k-th largest |Delta| lies after pass 1."""

    keep: int  # k
    coarse_bin: Optional[int]  # None: nothing to refine (keep none or all)
    rank: int  # 1-based rank of the k-th largest inside ``coarse_bin``, from the top
    everything: bool = False  # k >= n


def locate(coarse: torch.Tensor, parameters: int, density: float) -> Boundary:
    """The coarse bin holding the k-th largest magnitude, k = keep_count(n, density)."""
    k = keep_count(parameters, density)
    if k <= 0:
        return Boundary(k, None, 0)
    if k >= parameters:
        return Boundary(k, None, 0, everything=True)
    from_top = coarse.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    bin_ = coarse.numel() - 1 - position
    above = int(from_top[position - 1]) if position > 0 else 0
    return Boundary(k, bin_, k - above)


def refine(boundary: Boundary, fine: Optional[torch.Tensor]) -> float:
    """The exact threshold (a float32 value) from the fine histogram of the boundary's
    coarse bin; -inf keeps everything, inf keeps nothing."""
    if boundary.coarse_bin is None:
        return -math.inf if boundary.everything else math.inf
    from_top = fine.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([boundary.rank], dtype=from_top.dtype)))
    low = fine.numel() - 1 - position
    bits = torch.tensor([(boundary.coarse_bin << 16) | low], dtype=torch.int32)
    return float(bits.view(torch.float32)[0])


class FineHistograms:
    """Pass 2 for one task vector: low-16-bit histograms inside the boundary bins
    (``counts``, filled by :class:`Counting` from the keys of ``pass2_kernel``)."""

    def __init__(self, bins: Sequence[int], dump: Optional[int] = None, device="cpu"):
        self.bins = sorted(set(bins))
        # coarse bin -> first fine slot of its histogram; other bins -> a dump slot
        # (``dump`` >= len(bins) * FINE_BINS, shared by the models of one run)
        self.dump = len(self.bins) * FINE_BINS if dump is None else dump
        offset_of = torch.full((COARSE_BINS,), self.dump, dtype=torch.int32)
        for slot, coarse_bin in enumerate(self.bins):
            offset_of[coarse_bin] = slot * FINE_BINS
        self.offset_of = offset_of.to(device)
        self.counts = torch.zeros(self.dump + 1, dtype=torch.int64, device=device)

    def of(self, coarse_bin: int) -> torch.Tensor:
        slot = self.bins.index(coarse_bin)
        return self.counts[slot * FINE_BINS:(slot + 1) * FINE_BINS].cpu()
