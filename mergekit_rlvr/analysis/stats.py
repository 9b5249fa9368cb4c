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
Pass 3 then counts, per entry, how many thresholds it passes (``bucketize``), which
gives every density's kept sets at once.
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


# ----------------------------------------------------------------- per chunk


@dataclass
class DeltaChunk:
    """One model's Delta on one chunk, with the masks every accumulator shares."""

    delta: torch.Tensor  # float32, 1-D
    magnitude: torch.Tensor  # |delta|
    updated: Optional[torch.Tensor] = None  # |delta| > epsilon
    changed: Optional[torch.Tensor] = None  # |delta| > eta * max(|theta_model|, |theta_base|)
    n_updated: int = 0
    n_changed: int = 0


def delta_chunks(models: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float, eta: float,
                 masks: str = "all") -> List[DeltaChunk]:
    """Delta = theta_model - theta_base in float32 (via ``task_vector``) for each model
    on one chunk; ``masks``: "none" (magnitudes only), "updated" or "all"."""
    base32 = base.reshape(-1).to(torch.float32)
    base_abs = base32.abs() if masks == "all" else None
    out = []
    for model in models:
        model32 = model.reshape(-1).to(torch.float32)
        delta = task_vector(model32, base32).to(torch.float32)
        magnitude = delta.abs()
        chunk = DeltaChunk(delta, magnitude)
        if masks != "none":
            chunk.updated = magnitude > epsilon
            chunk.n_updated = _count(chunk.updated)
        if masks == "all":
            scale = model32.abs()
            torch.maximum(scale, base_abs, out=scale)
            chunk.changed = magnitude > scale.mul_(eta)
            chunk.n_changed = _count(chunk.changed)
        out.append(chunk)
    return out


def opposite(a: DeltaChunk, b: DeltaChunk, product: Optional[torch.Tensor] = None,
             epsilon: float = 0.0) -> torch.Tensor:
    """Opposite signs (meaningful where both are updated, hence non-zero). The
    product's sign when both |Delta| > epsilon >= 1e-18 (their product cannot
    underflow to zero), else the sign bits."""
    if product is not None and epsilon >= 1e-18:
        return product < 0
    return torch.signbit(a.delta).logical_xor_(torch.signbit(b.delta))


def _sq(x: torch.Tensor) -> float:
    """Sum of squares (float32 cascade reduction, returned as a Python float)."""
    return float(torch.linalg.vector_norm(x)) ** 2 if x.numel() else 0.0


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def magnitude_bits(magnitude: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative float32 values (monotone in the value)."""
    return magnitude.contiguous().view(torch.int32)


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

    def add(self, name: str, chunk: DeltaChunk) -> None:
        n = chunk.delta.numel()
        s = _sq(chunk.delta)
        self.parameters += n
        self.sumsq += s
        self.updated += chunk.n_updated
        self.changed += chunk.n_changed
        layer = layer_index(name)
        if layer is not None:
            self.layer_sumsq[layer] = self.layer_sumsq.get(layer, 0.0) + s
        kind = module_kind(name)
        self.kind_sumsq[kind] = self.kind_sumsq.get(kind, 0.0) + s
        self.kind_parameters[kind] = self.kind_parameters.get(kind, 0) + n
        hi = torch.bitwise_right_shift(magnitude_bits(chunk.magnitude), 16)
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
    epsilon: float = 0.0  # the update threshold (decides how signs are compared)

    def add(self, name: str, a: DeltaChunk, b: DeltaChunk) -> None:
        self.parameters += a.delta.numel()
        product = a.delta * b.delta  # Eq. 9 of paper 002
        d = float(product.sum()) if product.numel() else 0.0
        self.dot += d
        layer = layer_index(name)
        if layer is not None:
            self.layer_dot[layer] = self.layer_dot.get(layer, 0.0) + d
        both = a.updated & b.updated
        overlap = _count(both)
        self.overlap += overlap
        self.conflict += _count(both.logical_and_(opposite(a, b, product, self.epsilon)))
        self.private += a.n_updated + b.n_updated - 2 * overlap
        inter = _count(a.changed & b.changed)
        self.changed_both += inter
        self.changed_either += a.n_changed + b.n_changed - inter
        # Eq. 10: L2 norm of the negative entries of the product
        self.conflict_sumsq += _sq(product.clamp_(max=0.0))


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

    def __init__(self, bins: Sequence[int]):
        self.bins = sorted(set(bins))
        # coarse bin -> first fine slot of its histogram; other bins -> a dump slot
        self.dump = len(self.bins) * FINE_BINS
        self.offset_of = torch.full((COARSE_BINS,), self.dump, dtype=torch.int32)
        for slot, coarse_bin in enumerate(self.bins):
            self.offset_of[coarse_bin] = slot * FINE_BINS
        self.counts = torch.zeros(self.dump + 1, dtype=torch.int64)

    def add(self, chunk: DeltaChunk) -> None:
        if not self.bins:
            return
        bits = magnitude_bits(chunk.magnitude)
        offset = self.offset_of[torch.bitwise_right_shift(bits, 16)]
        inside = offset != self.dump
        key = torch.bitwise_and(bits, 0xFFFF).mul_(inside).add_(offset)
        self.counts += torch.bincount(key, minlength=self.counts.numel())

    def of(self, coarse_bin: int) -> torch.Tensor:
        slot = self.bins.index(coarse_bin)
        return self.counts[slot * FINE_BINS:(slot + 1) * FINE_BINS]


# ----------------------------------------------------------------- pass 3


class Thresholds:
    """A task vector's global thresholds per density, sorted for ``bucketize``."""

    def __init__(self, by_density: Dict[float, float]):
        self.by_density = dict(by_density)
        values = sorted(set(by_density.values()))
        self.values = torch.tensor(values, dtype=torch.float32)
        self.index = {d: values.index(t) for d, t in by_density.items()}

    def passed(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Per entry, how many thresholds t have |Delta| >= t (kept at threshold j
        iff the count exceeds j)."""
        return torch.bucketize(magnitude, self.values, right=True, out_int32=True)


@dataclass
class TopModuleStats:
    """Pass 3 for one task vector: entries of each module kind in the global top."""

    threshold_slot: int
    kept: int = 0
    kind_kept: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, passed: torch.Tensor) -> None:
        kept = _count(passed > self.threshold_slot)
        kind = module_kind(name)
        self.kept += kept
        self.kind_kept[kind] = self.kind_kept.get(kind, 0) + kept


class DensityConflictStats:
    """Pass 3 for a pair: joint histogram of (thresholds passed by a, by b) for
    entries updated in both, split by agreeing / opposite signs."""

    def __init__(self, slots_a: int, slots_b: int, epsilon: float = 0.0):
        self.epsilon = epsilon
        self.width = slots_b + 1
        self.size = (slots_a + 1) * (slots_b + 1)
        self.counts = torch.zeros(3 * self.size, dtype=torch.int64)

    def add(self, a: DeltaChunk, b: DeltaChunk, passed_a: torch.Tensor, passed_b: torch.Tensor) -> None:
        both = a.updated & b.updated
        category = both.to(torch.int32)  # 0 not co-updated, 1 agree, 2 conflict
        product = torch.mul(a.delta, b.delta) if self.epsilon >= 1e-18 else None
        category += both.logical_and_(opposite(a, b, product, self.epsilon))
        code = passed_a.to(torch.int32) * self.width
        code += passed_b
        code += category.mul_(self.size)
        self.counts += torch.bincount(code, minlength=3 * self.size)

    def rate(self, slot_a: int, slot_b: int) -> Tuple[int, int]:
        """(co-kept entries updated in both, of which opposite signs) when a keeps
        entries passing more than ``slot_a`` thresholds and b more than ``slot_b``."""
        grid = self.counts.view(3, -1, self.width)
        agree = int(grid[1, slot_a + 1:, slot_b + 1:].sum())
        conflict = int(grid[2, slot_a + 1:, slot_b + 1:].sum())
        return agree + conflict, conflict
