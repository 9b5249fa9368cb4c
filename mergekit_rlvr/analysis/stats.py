"""Pure statistics of task vectors, accumulated chunk by chunk (no I/O).

Every figure of ``mergekit-rlvr analyze`` is a sum over entries, so a model can be
streamed in chunks of any size and the result does not depend on the chunking.

Global top-k ("keep the top k of the whole vector by magnitude", papers 000 Fig. 1b-c
/ Table 12 and 002 Fig. 8) needs the k-th largest |Delta| of the whole model. It is
found exactly, with memory independent of the model size, from histograms of the
float32 bit patterns of |Delta| (for non-negative floats the bit pattern orders like
the value): a coarse histogram of the top 16 bits (pass 1), then a fine histogram of
the low 16 bits inside the few coarse bins that hold a threshold (pass 2). The rule
is that of :func:`mergekit_rlvr.methods.dots.magnitude_threshold` applied to the
whole model: k = ``keep_count(n, density)``, entries with |Delta| >= the k-th
largest are kept (ties kept); k <= 0 keeps nothing, k >= n keeps everything.
Pass 3 then counts, per entry, how many thresholds it passes, which gives every
density's kept sets at once (a joint histogram per pair gives the sign conflicts of
any pair of densities). Exactness is checked in tests/test_analyze.py against
``magnitude_threshold``/``sparsify`` on the concatenated in-memory model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_rlvr.methods.common import task_vector
from mergekit_rlvr.methods.dots import keep_count

#: the kept shares of ``sign_conflict_by_density`` (0.1, 0.2, ..., 1.0)
DENSITIES: Tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
MODULE_KINDS = ("attention", "mlp", "norm", "embedding", "lm_head")
COARSE_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit is 0)
FINE_BINS = 1 << 16

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index(name: str) -> Optional[int]:
    """Decoder layer of a tensor named like ``model.layers.<i>.…``, else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """attention, mlp, norm, embedding, lm_head or other (norms inside attention,
    such as Qwen3's ``self_attn.q_norm``, count as norm)."""
    lowered = name.lower()
    if "embed_tokens" in lowered or "wte" in lowered.split("."):
        return "embedding"
    if "lm_head" in lowered:
        return "lm_head"
    leaf = lowered.rsplit(".", 2)
    if any("norm" in part for part in leaf[-2:]) or "layernorm" in lowered:
        return "norm"
    if "self_attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "feed_forward" in lowered:
        return "mlp"
    return "other"


# ----------------------------------------------------------------- per-chunk kernels
#
# One function per pass does all the elementwise work on a chunk of every model and
# returns scalars and the integer keys that get histogrammed. They are plain torch
# code, run as is or fused by ``torch.compile`` (``Kernels``): the same source
# either way.


def _deltas(models: Sequence[torch.Tensor], base: torch.Tensor):
    """(base in float32, [(model in float32, Delta = task_vector in float32)])."""
    base32 = base.reshape(-1).to(torch.float32)
    out = []
    for model in models:
        model32 = model.reshape(-1).to(torch.float32)
        out.append((model32, task_vector(model32, base32).to(torch.float32)))
    return base32, out


def _opposite(a: torch.Tensor, b: torch.Tensor, product: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Opposite signs where both are updated (hence non-zero): the product's sign when
    epsilon >= 1e-18 (the product of two such entries cannot underflow to zero),
    else the sign bits."""
    if epsilon >= 1e-18:
        return product < 0
    return torch.signbit(a) ^ torch.signbit(b)


def pass1_kernel(models: List[torch.Tensor], base: torch.Tensor, epsilon: float, eta: float):
    """Per model: (||Delta||, #updated, #changed, top 16 bits of |Delta|); per pair in
    ``itertools.combinations`` order: (Delta_a . Delta_b, #co-updated, #co-updated
    with opposite signs, #changed in both, ||min(Delta_a * Delta_b, 0)||, and over
    the entries changed in both: Delta_a . Delta_b, ||Delta_a||^2, ||Delta_b||^2)."""
    base32, pairs = _deltas(models, base)
    base_abs = base32.abs()
    per_model, deltas, updated, changed = [], [], [], []
    for model32, delta in pairs:
        magnitude = delta.abs()
        up = magnitude > epsilon
        ch = magnitude > torch.maximum(model32.abs(), base_abs) * eta
        hi = torch.bitwise_right_shift(magnitude.view(torch.int32), 16)
        per_model.append((torch.linalg.vector_norm(delta), torch.count_nonzero(up), torch.count_nonzero(ch), hi))
        deltas.append(delta)
        updated.append(up)
        changed.append(ch)
    per_pair = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            product = deltas[i] * deltas[j]  # Eq. 9 of paper 002
            both = updated[i] & updated[j]
            conflict = both & _opposite(deltas[i], deltas[j], product, epsilon)
            changed_both = changed[i] & changed[j]
            weight = changed_both.to(product.dtype)  # 1 on the overlap of the changed masks, else 0
            a_ov, b_ov = deltas[i] * weight, deltas[j] * weight
            per_pair.append((
                product.sum(),
                torch.count_nonzero(both),
                torch.count_nonzero(conflict),
                torch.count_nonzero(changed_both),
                torch.linalg.vector_norm(torch.clamp(product, max=0.0)),  # Eq. 10
                # paper 004 Fig. 3: the two updates on the overlap of the changed masks
                torch.dot(a_ov, deltas[j]), torch.dot(a_ov, a_ov), torch.dot(b_ov, b_ov),
            ))
    return per_model, per_pair


def pass2_kernel(models: List[torch.Tensor], base: torch.Tensor, tables: List[torch.Tensor], dump: int):
    """Per model, the fine-histogram key of every entry: its boundary bin's offset plus
    the low 16 bits of |Delta| inside a boundary bin, ``dump`` elsewhere."""
    _, pairs = _deltas(models, base)
    keys = []
    for (_, delta), table in zip(pairs, tables):
        bits = delta.abs().view(torch.int32)
        offset = table[torch.bitwise_right_shift(bits, 16)]
        keys.append(torch.where(offset == dump, dump, torch.bitwise_and(bits, 0xFFFF) + offset))
    return keys


def _passed(magnitude: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """How many of the sorted thresholds t have |Delta| >= t (int32). Fused, a few
    compares per entry beat a binary search; eager, ``bucketize`` does."""
    if torch.compiler.is_compiling():
        count = (magnitude >= values[0]).to(torch.int32)
        for k in range(1, values.numel()):
            count = count + (magnitude >= values[k]).to(torch.int32)
        return count
    return torch.bucketize(magnitude, values, right=True, out_int32=True)


def pass3_kernel(models: List[torch.Tensor], base: torch.Tensor, thresholds: List[torch.Tensor],
                 top_slots: List[int], epsilon: float):
    """Per model, the entries passing its --top threshold; per pair, the key
    category * size + passed_a * width + passed_b (category 0: not co-updated,
    1: co-updated with equal signs, 2: opposite signs), where passed = how many of
    the model's thresholds t have |Delta| >= t."""
    _, pairs = _deltas(models, base)
    deltas, updated, passed, tops = [], [], [], []
    for (_, delta), values, top_slot in zip(pairs, thresholds, top_slots):
        magnitude = delta.abs()
        count = _passed(magnitude, values)
        tops.append(torch.count_nonzero(count > top_slot))
        deltas.append(delta)
        updated.append(magnitude > epsilon)
        passed.append(count)
    codes = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            width = thresholds[j].numel() + 1
            size = (thresholds[i].numel() + 1) * width
            both = updated[i] & updated[j]
            conflict = both & _opposite(deltas[i], deltas[j], deltas[i] * deltas[j], epsilon)
            category = both.to(torch.int32) + conflict.to(torch.int32)
            codes.append(category * size + passed[i] * width + passed[j])
    return tops, codes


class Kernels:
    """The three pass kernels, eager or fused with ``torch.compile`` (dynamic shapes).
    A compiled kernel that fails (no C++ compiler, unsupported op) falls back to
    eager for the rest of the run, with one warning line."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.functions = {"pass1": pass1_kernel, "pass2": pass2_kernel, "pass3": pass3_kernel}
        self.active = dict(self.functions)
        if compiled:
            self.active = {k: torch.compile(f, dynamic=True) for k, f in self.functions.items()}

    def __call__(self, which: str, *args):
        try:
            return self.active[which](*args)
        except Exception as error:  # torch._dynamo / inductor raise many kinds
            if self.active[which] is self.functions[which]:
                raise
            import sys

            sys.stderr.write(f"warning: torch.compile of {which} failed ({type(error).__name__}); running eager\n")
            self.active[which] = self.functions[which]
            return self.functions[which](*args)


# ----------------------------------------------------------------- pass 1


@dataclass
class VectorStats:
    """Pass 1 for one task vector: norms, update counts, |Delta| histogram."""

    parameters: int = 0
    sumsq: float = 0.0
    updated: int = 0
    changed: int = 0
    layer_sumsq: Dict[int, float] = field(default_factory=dict)
    kind_sumsq: Dict[str, float] = field(default_factory=dict)
    kind_parameters: Dict[str, int] = field(default_factory=dict)
    coarse: torch.Tensor = field(default_factory=lambda: torch.zeros(COARSE_BINS, dtype=torch.int64))

    def add(self, name: str, n: int, terms) -> None:
        """``terms``: this model's entry of ``pass1_kernel``'s per-model list."""
        norm, updated, changed, hi = terms
        s = float(norm) ** 2
        self.parameters += n
        self.sumsq += s
        self.updated += int(updated)
        self.changed += int(changed)
        layer = layer_index(name)
        if layer is not None:
            self.layer_sumsq[layer] = self.layer_sumsq.get(layer, 0.0) + s
        kind = module_kind(name)
        self.kind_sumsq[kind] = self.kind_sumsq.get(kind, 0.0) + s
        self.kind_parameters[kind] = self.kind_parameters.get(kind, 0) + n
        counts = torch.bincount(hi)
        self.coarse[:counts.numel()] += counts


@dataclass
class PairStats:
    """Pass 1 for an unordered pair of task vectors."""

    parameters: int = 0
    dot: float = 0.0
    layer_dot: Dict[int, float] = field(default_factory=dict)
    overlap: int = 0
    conflict: int = 0
    private: int = 0
    changed_both: int = 0
    changed_either: int = 0
    conflict_sumsq: float = 0.0

    def add(self, name: str, n: int, terms, a, b) -> None:
        """``terms``: this pair's entry of ``pass1_kernel``; ``a``, ``b``: the two
        models' per-model entries."""
        dot, overlap, conflict, changed_both, conflict_norm = (t.item() for t in terms[:5])
        d = float(dot)
        self.parameters += n
        self.dot += d
        layer = layer_index(name)
        if layer is not None:
            self.layer_dot[layer] = self.layer_dot.get(layer, 0.0) + d
        self.overlap += int(overlap)
        self.conflict += int(conflict)
        self.private += int(a[1]) + int(b[1]) - 2 * int(overlap)
        self.changed_both += int(changed_both)
        self.changed_either += int(a[2]) + int(b[2]) - int(changed_both)
        self.conflict_sumsq += float(conflict_norm) ** 2


# ----------------------------------------------------------------- thresholds


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
    """Pass 2 for one task vector: low-16-bit histograms inside the boundary bins."""

    def __init__(self, bins: Sequence[int], dump: Optional[int] = None):
        self.bins = sorted(set(bins))
        # coarse bin -> first fine slot of its histogram; other bins -> a dump slot
        # (``dump`` >= len(bins) * FINE_BINS, shared by the models of one run)
        self.dump = len(self.bins) * FINE_BINS if dump is None else dump
        self.offset_of = torch.full((COARSE_BINS,), self.dump, dtype=torch.int32)
        for slot, coarse_bin in enumerate(self.bins):
            self.offset_of[coarse_bin] = slot * FINE_BINS
        self.counts = torch.zeros(self.dump + 1, dtype=torch.int64)

    def add(self, key: torch.Tensor) -> None:
        """``key``: this model's entry of ``pass2_kernel`` (built with ``offset_of``)."""
        if self.bins:
            self.counts += torch.bincount(key, minlength=self.counts.numel())

    def of(self, coarse_bin: int) -> torch.Tensor:
        slot = self.bins.index(coarse_bin)
        return self.counts[slot * FINE_BINS:(slot + 1) * FINE_BINS]


# ----------------------------------------------------------------- pass 3


class Thresholds:
    """A task vector's global thresholds per density, sorted for ``bucketize``."""

    def __init__(self, by_density: Dict[float, float]):
        self.by_density = dict(by_density)
        # duplicates kept (a constant count for compiled kernels); a density's slot
        # is the first occurrence of its threshold
        values = sorted(by_density.values())
        self.values = torch.tensor(values, dtype=torch.float32)
        self.index = {d: values.index(t) for d, t in by_density.items()}

    def passed(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Per entry, how many thresholds t have |Delta| >= t (kept at threshold j
        iff the count exceeds j)."""
        return _passed(magnitude, self.values)


@dataclass
class TopModuleStats:
    """Pass 3 for one task vector: entries of each module kind in the global top."""

    threshold_slot: int
    kept: int = 0
    kind_kept: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, kept) -> None:
        kept = int(kept)
        kind = module_kind(name)
        self.kept += kept
        self.kind_kept[kind] = self.kind_kept.get(kind, 0) + kept


class DensityConflictStats:
    """Pass 3 for a pair: joint histogram of (thresholds passed by a, by b) for
    entries updated in both, split by agreeing / opposite signs."""

    def __init__(self, slots_a: int, slots_b: int):
        self.width = slots_b + 1
        self.size = (slots_a + 1) * (slots_b + 1)
        self.counts = torch.zeros(3 * self.size, dtype=torch.int64)

    def add(self, code: torch.Tensor) -> None:
        """``code``: this pair's entry of ``pass3_kernel``."""
        self.counts += torch.bincount(code, minlength=3 * self.size)

    def rate(self, slot_a: int, slot_b: int) -> Tuple[int, int]:
        """(co-kept entries updated in both, of which opposite signs) when a keeps
        entries passing more than ``slot_a`` thresholds and b more than ``slot_b``."""
        grid = self.counts.view(3, -1, self.width)
        agree = int(grid[1, slot_a + 1:, slot_b + 1:].sum())
        conflict = int(grid[2, slot_a + 1:, slot_b + 1:].sum())
        return agree + conflict, conflict
