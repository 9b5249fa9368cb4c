"""Exact compact storage of a recipe's fixed vectors, and the swap's arithmetic on it.

Pure torch, no vLLM: every function works on CPU or CUDA tensors alike (the GPU
kernel layer of issue 15 builds on it; the worker calls it).

One :class:`Packed` per tensor (a vLLM parameter in its own layout, or a checkpoint
tensor or this rank's part of it) holds:

- ``touched``: the entries some vector changes, as a bitmask (1 bit per entry; None
  when all are). Elsewhere the merged weight is the base for every coefficient, so
  the swap never writes there and nothing is stored for them.
- ``base``: the base at the touched entries, in the narrowest dtype that holds the
  merge dtype's values exactly (bf16 checkpoints: bf16).
- per vector: its support within ``touched`` (a bitmask, or None for all) and either
  the fine-tuned model's own values there (``recompute``: dots, task_arithmetic,
  reasoning_interp; the task vector ``((theta - theta_base) * scale)`` is recomputed
  at each swap, in float32, exactly as the kernels compute it) or the vector's own
  values (sar's arbitrated delta), each in the narrowest exact dtype.

Entries of a vector whose value is +-0 are left out of its support where the base is
not -0.0: there the running float sum is never -0.0 (a round-to-nearest sum is -0.0
only when every term is), so adding +-0 leaves it unchanged bit for bit.

:func:`combine_packed` gives, at the touched entries, exactly what
``mergekit_rlvr.methods.common.combine(base, vectors, c, out_dtype=merge dtype)``
gives: float32 work (float64 for a float64 merge), per vector one multiply and one
add per entry in vector order, rounded once. On CPU tensors it and :func:`scatter` run
as one C loop per tensor (:mod:`vllm_plugins.cpu_kernel`, same bits); elsewhere (CUDA),
or without a C compiler, as the torch index ops below. The swap itself is :func:`apply`:
on CPU one pass that writes the merged values straight into the live tensor at the
touched entries (no merged buffer), from block starts computed once by :func:`pack`
(``starts``: per block of ``cpu_kernel.BLOCK`` entries, where its touched entries and
each vector's values begin; 8 bytes per block, counted in ``nbytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_rlvr.methods.common import MaskedVector, RecomputedVector, SparseVector
from vllm_plugins import cpu_kernel
from vllm_plugins.cpu_kernel import BLOCK

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------- bits
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries a byte (row-major, low bit first)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, count: int) -> torch.Tensor:
    """The flat bool tensor of ``count`` entries that :func:`pack_bits` packed."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[:count].bool()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(_INT[a.element_size()]), b.reshape(-1).view(_INT[b.element_size()]))


#: per merge dtype, the narrower dtypes tried, narrowest first
_NARROWER = {torch.float32: (torch.bfloat16, torch.float16),
             torch.float64: (torch.bfloat16, torch.float16, torch.float32)}


def narrowest(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the smallest floating dtype that gives back its exact bits."""
    for dtype in _NARROWER.get(t.dtype, ()):
        narrow = t.to(dtype)
        if same_bits(narrow.to(t.dtype), t):
            return narrow
    return t


def narrowest_size(t: torch.Tensor, where: Optional[torch.Tensor]) -> int:
    """``narrowest(t[where]).element_size()`` (``where`` None: all of ``t``)."""
    as_int = _INT[t.element_size()]
    bits = t.reshape(-1).view(as_int)
    for dtype in _NARROWER.get(t.dtype, ()):
        same = t.reshape(-1).to(dtype).to(t.dtype).view(as_int) == bits
        if bool(same.all() if where is None else (same | ~where).all()):
            return torch.empty(0, dtype=dtype).element_size()
    return t.element_size()


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# --------------------------------------------------------------------------- formats
@dataclass
class PackedVector:
    bits: Optional[torch.Tensor]  # support within the touched entries (None: all of them)
    values: torch.Tensor  # at the support, narrowest exact dtype
    recompute: bool  # values are the model's (vector = (values - base) * scale)
    scale: Optional[float] = None
    starts: Optional[torch.Tensor] = None  # int64: its first value in each block (with bits)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.bits) + _nbytes(self.values) + _nbytes(self.starts)

    def to(self, device) -> "PackedVector":
        return replace(self, bits=_move(self.bits, device), values=_move(self.values, device),
                       starts=_move(self.starts, device))


@dataclass
class Packed:
    shape: torch.Size
    dtype: torch.dtype  # the merge dtype (combine's base dtype and out_dtype)
    count: int  # touched entries
    touched: Optional[torch.Tensor]  # bits over all entries (None: all touched)
    base: torch.Tensor  # at the touched entries
    vectors: List[PackedVector] = field(default_factory=list)
    starts: Optional[torch.Tensor] = None  # int64: each block's first touched entry (with touched)
    kernel: Dict = field(default_factory=dict, init=False, repr=False, compare=False)  # cpu_kernel's arguments

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def base_nbytes(self) -> int:
        return _nbytes(self.touched) + _nbytes(self.base) + _nbytes(self.starts)

    @property
    def vector_nbytes(self) -> int:
        return sum(v.nbytes for v in self.vectors)

    @property
    def nbytes(self) -> int:
        return self.base_nbytes + self.vector_nbytes

    def __getstate__(self):  # (pickled without the kernel's ctypes arguments: rebuilt at the next swap)
        return {**self.__dict__, "kernel": {}}

    def touched_mask(self) -> Optional[torch.Tensor]:
        """Flat bool mask of the touched entries (None: all)."""
        return None if self.touched is None else unpack_bits(self.touched, self.numel)

    def to(self, device) -> "Packed":
        """On ``device``; ``"pinned"``: page-locked host memory (the offload mode, streamed
        to the device at each swap; plain host memory where there is no CUDA)."""
        return replace(self, touched=_move(self.touched, device), base=_move(self.base, device),
                       vectors=[v.to(device) for v in self.vectors], starts=_move(self.starts, device))


def _move(t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if device == "pinned":
        t = t.cpu()
        return t.pin_memory() if torch.cuda.is_available() else t
    return t.to(device, non_blocking=True)


# --------------------------------------------------------------------------- packing
def _support(vector, base: torch.Tensor, negative_zero: torch.Tensor):
    """(flat support, flat values to keep, recompute, scale) of one vector."""
    if isinstance(vector, RecomputedVector):
        model = vector.model.reshape(-1)
        changed = (vector.values(base).reshape(-1) != 0) | negative_zero
        mask = None if vector.mask is None else vector.mask.reshape(-1)
        return (changed if mask is None else changed & mask), model, True, vector.scale
    if isinstance(vector, SparseVector):
        vector = MaskedVector(vector.mask, vector.dense())
    if isinstance(vector, MaskedVector):
        values = vector.values.reshape(-1)
        return vector.mask.reshape(-1) & ((values != 0) | negative_zero), values, False, None
    values = vector.reshape(-1)
    return (values != 0) | negative_zero, values, False, None


def supports(base: torch.Tensor, vectors: Sequence):
    """(per vector ``(flat support, flat values to keep, recompute, scale)``, the flat
    touched mask: the union of the supports)."""
    flat = base.reshape(-1)
    negative_zero = (flat == 0) & torch.signbit(flat)
    parts = [_support(v, base, negative_zero) for v in vectors]
    touched = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    for support, *_ in parts:
        touched |= support
    return parts, touched


def pack(base: torch.Tensor, vectors: Sequence) -> Packed:
    """Pack ``vectors`` (``RecomputedVector``, ``MaskedVector``, ``SparseVector`` or
    dense tensors, all of ``base``'s shape) to be added to ``base`` (merge dtype)."""
    flat = base.reshape(-1)
    parts, touched = supports(base, vectors)
    everything = bool(touched.all())
    count = flat.numel() if everything else int(touched.sum())
    touched_bits = None if everything else pack_bits(touched)
    edges = (torch.arange((flat.numel() + BLOCK - 1) // BLOCK + 1, device=flat.device) * BLOCK).clamp_(max=flat.numel())
    starts = None if everything else _ones_before(touched_bits, edges)
    packed_vectors = []
    for support, values, recompute, scale in parts:
        within = support if everything else support[touched]
        whole = bool(within.all())
        kept = values if everything and whole else values[support]
        bits = None if whole else pack_bits(within)
        packed_vectors.append(PackedVector(bits, narrowest(kept.contiguous()), recompute, scale,
                                           None if whole else _ones_before(bits, edges if everything else starts)))
    return Packed(base.shape, base.dtype, count, touched_bits,
                  narrowest((flat if everything else flat[touched]).contiguous()), packed_vectors, starts)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _ones_before(bits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """How many bits of ``bits`` (from :func:`pack_bits`) are set before each of ``positions``."""
    popcount = _POPCOUNT.to(bits.device)
    ones = torch.cat([positions.new_zeros(1), popcount[bits.long()].cumsum(0)])
    byte, shift = positions >> 3, positions & 7
    low = torch.cat([bits, bits.new_zeros(1)])[byte].long() & ((torch.ones_like(shift) << shift) - 1)
    return ones[byte] + popcount[low]


# --------------------------------------------------------------------------- the swap
def combine_packed(p: Packed, coefficients: Sequence[float]) -> torch.Tensor:
    """``combine(base, vectors, coefficients, out_dtype=p.dtype)`` at the touched
    entries (1-D, row-major), bit for bit."""
    _check(p, coefficients)
    if cpu_kernel.wanted(p.base, p.count):
        return cpu_kernel.combine(p, coefficients)
    work = torch.float64 if p.dtype == torch.float64 else torch.float32
    base = p.base.to(work)
    acc = base.clone()
    for vector, coefficient in zip(p.vectors, coefficients):
        if not vector.values.numel():
            continue
        # positions within the touched entries (index ops: several times faster than boolean indexing on CPU)
        index = None if vector.bits is None else unpack_bits(vector.bits, p.count).nonzero().squeeze(1)
        values = vector.values.to(work)
        if vector.recompute:
            values = values - (base if index is None else base.index_select(0, index))
            if vector.scale is not None:
                values = values * vector.scale
        values = values * float(coefficient)
        if index is None:
            acc += values
        else:  # one add per (distinct) position: acc + values, as combine does
            acc.index_add_(0, index, values)
    return acc.to(p.dtype)


def _check(p: Packed, coefficients: Sequence[float]) -> None:
    if len(p.vectors) != len(coefficients):
        raise ValueError(f"{len(p.vectors)} vectors but {len(coefficients)} coefficients")


def apply(p: Packed, coefficients: Sequence[float], out: torch.Tensor,
          via: Optional[torch.dtype] = None) -> torch.Tensor:
    """The swap: ``out`` (``p.shape`` entries, contiguous, any dtype) at the touched
    entries becomes ``combine_packed(p, coefficients)`` cast to ``via`` (mergekit's
    saved dtype, where it has one) and to ``out``'s dtype, bit for bit; the other
    entries are left as they are. On CPU one pass of the C loop (no merged buffer)."""
    _check(p, coefficients)
    flat = out.view(-1)
    if not p.count:  # no vector changes any entry
        return out
    if cpu_kernel.apply(p, coefficients, flat, via):
        return out
    merged = combine_packed(p, coefficients)
    scatter(p, merged if via is None else merged.to(via), flat)
    return out


def apply_all(items: Sequence) -> None:
    """:func:`apply` on every ``(p, coefficients, out, via)`` of ``items``: on CPU one
    call of the C loop for them all (threads inside), the others one by one."""
    for p, c, _, _ in items:
        _check(p, c)
    flat = [(p, c, out.view(-1), via) for p, c, out, via in items]
    for p, c, out, via in cpu_kernel.apply_all([i for i in flat if i[0].count]):
        apply(p, c, out, via)


def scatter(p: Packed, merged: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``merged`` (from :func:`combine_packed`, cast as wanted) into ``out``
    (``p.shape``, contiguous) at the touched entries."""
    flat = out.view(-1)
    if p.touched is None:
        flat.copy_(merged)
    elif cpu_kernel.wanted(flat, p.count):
        cpu_kernel.scatter(p.touched, merged.to(flat.dtype), flat, p.starts)
    else:
        flat.masked_scatter_(p.touched_mask(), merged.to(flat.dtype))
    return out


def merge_dense(p: Packed, coefficients: Sequence[float], full_base: torch.Tensor) -> torch.Tensor:
    """The whole merged tensor (merge dtype): ``full_base`` (the base, any dtype that
    holds it exactly) with the touched entries recombined."""
    return apply(p, coefficients, full_base.to(p.dtype, copy=True).contiguous())
