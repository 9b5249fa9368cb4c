"""Pure statistics of task vectors, accumulated chunk by chunk (no I/O).

Every figure of ``mergekit-rlvr analyze`` is a sum over entries, so a model can be
streamed in chunks of any size and the result does not depend on the chunking.

Global top-k ("keep the top k of the whole vector by magnitude", papers 000 Fig. 1b-c
/ Table 12 and 002 Fig. 8) needs the k-th largest |Delta| of the whole model. It is
found exactly, with memory independent of the model size, from histograms of the
float32 bit patterns of |Delta| (``histograms``): a coarse histogram of the top 16
bits and fine ones inside the few coarse bins that hold a threshold. The rule
is that of :func:`mergekit_rlvr.methods.dots.magnitude_threshold` applied to the
whole model: k = ``keep_count(n, density)``, entries with |Delta| >= the k-th
largest are kept (ties kept); k <= 0 keeps nothing, k >= n keeps everything.
Pass 3 then counts, per entry, how many thresholds it passes, which gives every
density's kept sets at once (a joint histogram per pair gives the sign conflicts of
any pair of densities). Exactness is checked in tests/analysis/test_analyze.py against
``magnitude_threshold``/``sparsify`` on the concatenated in-memory model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


#: the kept shares of ``sign_conflict_by_density`` (0.1, 0.2, ..., 1.0)
DENSITIES: Tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
MODULE_KINDS = ("attention", "mlp", "norm", "embedding", "lm_head")

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


# ----------------------------------------------------------------- pass 1


@dataclass
class VectorStats:
    """Pass 1 for one task vector: norms, update counts, |Delta| histogram."""

    histogram: "MagnitudeHistogram"
    parameters: int = 0
    sumsq: float = 0.0
    updated: int = 0
    changed: int = 0
    layer_sumsq: Dict[int, float] = field(default_factory=dict)
    kind_sumsq: Dict[str, float] = field(default_factory=dict)
    kind_parameters: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int, terms) -> None:
        """``terms``: this model's (||Delta||, #updated, #changed) of the pass 1 kernels
        (``backend``; its histogram is counted apart)."""
        norm, updated, changed = terms[:3]
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
        dot, overlap, conflict, changed_both, conflict_norm = terms[:5]
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


# ----------------------------------------------------------------- pass 3


class Thresholds:
    """A task vector's global thresholds per density, sorted for ``bucketize``."""

    def __init__(self, by_density: Dict[float, float], device="cpu"):
        self.by_density = dict(by_density)
        # duplicates kept (a constant count for compiled kernels); a density's slot
        # is the first occurrence of its threshold; kept at slot j iff passed > j
        values = sorted(by_density.values())
        self.values = torch.tensor(values, dtype=torch.float32, device=device)
        self.index = {d: values.index(t) for d, t in by_density.items()}


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
    entries updated in both, split by agreeing / opposite signs (``counts``: the
    pair's ``pass3_kernel`` codes, counted by the pass 3 kernels of ``backend``)."""

    def __init__(self, slots_a: int, slots_b: int, device="cpu"):
        self.width = slots_b + 1
        self.size = (slots_a + 1) * (slots_b + 1)
        self.counts = torch.zeros(3 * self.size, dtype=torch.int64, device=device)

    def rate(self, slot_a: int, slot_b: int) -> Tuple[int, int]:
        """(co-kept entries updated in both, of which opposite signs) when a keeps
        entries passing more than ``slot_a`` thresholds and b more than ``slot_b``."""
        grid = self.counts.cpu().view(3, -1, self.width)
        agree = int(grid[1, slot_a + 1:, slot_b + 1:].sum())
        conflict = int(grid[2, slot_a + 1:, slot_b + 1:].sum())
        return agree + conflict, conflict
