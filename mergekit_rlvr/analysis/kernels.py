"""The per-chunk kernels of ``mergekit-rlvr analyze`` (pure torch, any device).

One function per pass does all the elementwise work on a chunk of every model and
returns scalars and the integer keys that get histogrammed (``stats``). They are
plain torch code on whatever device the chunks are on, run as is or fused by
``torch.compile`` (``Kernels``): the same source either way.

Histogram keys of |Delta| use its float32 bit pattern (for non-negative floats the
bit pattern orders like the value): the coarse bin is the top 16 bits; inside the
coarse bins a histogram refines (``table[bin] >= 0``, the bin's first fine slot),
the key is ``COARSE_BINS + table[bin] + low 16 bits`` instead.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from mergekit_rlvr.methods.common import task_vector

COARSE_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit is 0)
FINE_BINS = 1 << 16


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


def histogram_key(bits: torch.Tensor, table: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """The key of every |Delta| bit pattern: its coarse bin, or inside a refined bin
    COARSE_BINS + the bin's first fine slot + the low 16 bits. ``table``: coarse bin ->
    first fine slot or -1; ``refined``: the refined bins in slot order, padded with -1.
    Fused, one compare and select per refined bin (vectorizes; an indexed load does
    not); eager, ``index_select`` on the table."""
    coarse = torch.bitwise_right_shift(bits, 16)
    low = torch.bitwise_and(bits, 0xFFFF)
    if torch.compiler.is_compiling():
        key = coarse  # refined bins are distinct: at most one matches
        for slot in range(refined.numel()):
            key = torch.where(coarse == refined[slot], low + (COARSE_BINS + slot * FINE_BINS), key)
        return key
    offset = table.index_select(0, coarse)
    return torch.where(offset < 0, coarse, offset + COARSE_BINS + low)


def pass1_kernel(models: List[torch.Tensor], base: torch.Tensor, tables: List[torch.Tensor],
                 refined: List[torch.Tensor], epsilon: float, eta: float):
    """Per model: (||Delta||, #updated, #changed, histogram key of |Delta|); per pair
    in ``itertools.combinations`` order: (Delta_a . Delta_b, #co-updated, #co-updated
    with opposite signs, #changed in both, ||min(Delta_a * Delta_b, 0)||, and over
    the entries changed in both: Delta_a . Delta_b, ||Delta_a||^2, ||Delta_b||^2)."""
    base32, pairs = _deltas(models, base)
    base_abs = base32.abs()
    per_model, deltas, updated, changed = [], [], [], []
    for (model32, delta), table, bins in zip(pairs, tables, refined):
        magnitude = delta.abs()
        up = magnitude > epsilon
        ch = magnitude > torch.maximum(model32.abs(), base_abs) * eta
        key = histogram_key(magnitude.view(torch.int32), table, bins)
        per_model.append((torch.linalg.vector_norm(delta), torch.count_nonzero(up), torch.count_nonzero(ch), key))
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


def sample_kernel(models: List[torch.Tensor], base: torch.Tensor):
    """Per model, the coarse bin (top 16 bits) of every |Delta| (the pre-pass sample)."""
    _, pairs = _deltas(models, base)
    return [torch.bitwise_right_shift(delta.abs().view(torch.int32), 16) for _, delta in pairs]


def pass2_kernel(models: List[torch.Tensor], base: torch.Tensor, tables: List[torch.Tensor], dump: int):
    """Per model, the fine-histogram key of every entry: its boundary bin's offset plus
    the low 16 bits of |Delta| inside a boundary bin, ``dump`` elsewhere."""
    _, pairs = _deltas(models, base)
    keys = []
    for (_, delta), table in zip(pairs, tables):
        bits = delta.abs().view(torch.int32)
        offset = table.index_select(0, torch.bitwise_right_shift(bits, 16))
        keys.append(torch.where(offset == dump, dump, torch.bitwise_and(bits, 0xFFFF) + offset))
    return keys


def passed(magnitude: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
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
    deltas, updated, counts, tops = [], [], [], []
    for (_, delta), values, top_slot in zip(pairs, thresholds, top_slots):
        magnitude = delta.abs()
        count = passed(magnitude, values)
        tops.append(torch.count_nonzero(count > top_slot))
        deltas.append(delta)
        updated.append(magnitude > epsilon)
        counts.append(count)
    codes = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            width = thresholds[j].numel() + 1
            size = (thresholds[i].numel() + 1) * width
            both = updated[i] & updated[j]
            conflict = both & _opposite(deltas[i], deltas[j], deltas[i] * deltas[j], epsilon)
            category = both.to(torch.int32) + conflict.to(torch.int32)
            codes.append(category * size + counts[i] * width + counts[j])
    return tops, codes


class Kernels:
    """The pass kernels, eager or fused with ``torch.compile`` (dynamic shapes).
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
