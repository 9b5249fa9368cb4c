"""What a worker holds for the swap, built tensor by tensor from a plan
(:mod:`vllm_plugins.plan`), and the swap itself on it. The compact formats and their
arithmetic are :mod:`vllm_plugins.packed`; :mod:`vllm_plugins.layout` maps
checkpoint-format tensors into vLLM's parameters. No vLLM import.

- :class:`InPlace`: one vLLM parameter (its layout: fused, this rank's shard), its
  packed base and vectors; a swap writes only the entries some vector changes (the
  others hold the base, written once when the recipe is loaded).
- :class:`Reload`: one checkpoint tensor (or the part this rank's loaders read); a
  swap builds the whole checkpoint-format tensor for vLLM's ``reload_weights``: the
  base, read again from its checkpoint (not held), with the changed entries merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from mergekit_rlvr.methods.common import MaskedVector, RecomputedVector
from vllm_plugins import packed


def _save(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The dtype mergekit writes (out_dtype / force_dtype), when it has one."""
    return t.to(dtype) if dtype is not None and dtype != t.dtype else t


@dataclass
class InPlace:
    name: str  # vLLM parameter name
    param: torch.Tensor  # the live parameter
    store: packed.Packed  # parameter layout
    save_dtype: Optional[torch.dtype]
    slots: List[int]  # per vector: its coefficient's index

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def swap(self, values: List[float]) -> None:
        store = self.store
        if store.base.device != self.param.device:  # host offload: streamed to the device for this swap
            store = store.to(self.param.device)
        packed.apply(store, [values[i] for i in self.slots], self.param.data, via=self.save_dtype)


def swap_all(entries: List[InPlace], values: List[float]) -> None:
    """``entry.swap(values)`` for every entry: those on the host in one call of the CPU
    kernel (packed.apply_all), the host-offloaded ones streamed one by one."""
    here = [e for e in entries if e.store.base.device == e.param.device]
    packed.apply_all([(e.store, [values[i] for i in e.slots], e.param.data, e.save_dtype) for e in here])
    for entry in entries:
        if entry.store.base.device != entry.param.device:
            entry.swap(values)


@dataclass
class Reload:
    name: str  # checkpoint tensor name
    store: packed.Packed  # checkpoint layout (or this rank's entries of it, flat)
    save_dtype: Optional[torch.dtype]
    slots: List[int]
    read_base: Callable[[], torch.Tensor]  # the base's tensor from its checkpoint
    cover: Optional[torch.Tensor] = None  # bits: the flat entries this rank's loaders read (None: all)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + (0 if self.cover is None else self.cover.numel())

    def tensor(self, values: List[float]) -> torch.Tensor:
        device = self.store.base.device
        full = _save(self.read_base().to(device=device, dtype=self.store.dtype), self.save_dtype)
        full = full.clone(memory_format=torch.contiguous_format)
        coefficients = [values[i] for i in self.slots]
        if self.cover is None:
            return packed.apply(self.store, coefficients, full, via=self.save_dtype)
        mine = packed.unpack_bits(self.cover, full.numel())
        full.view(-1)[mine] = packed.apply(self.store, coefficients, full.view(-1)[mine], via=self.save_dtype)
        return full


@dataclass
class _Pending:
    """A parameter filled from several checkpoint tensors (q/k/v, gate/up)."""

    base: torch.Tensor  # merge dtype, parameter layout
    models: List[torch.Tensor] = field(default_factory=list)
    masks: List[torch.Tensor] = field(default_factory=list)
    explicit: List[Optional[torch.Tensor]] = field(default_factory=list)
    scales: List[set] = field(default_factory=list)
    recompute: List[bool] = field(default_factory=list)


class BaseMismatch(Exception):
    """A parameter planned in place does not hold the base as its loaders put it."""


class Builder:
    """Stored entries for a plan, fed one planned tensor at a time (``add``).
    ``check_base``: each in-place parameter is compared with the base replayed into its
    layout from the tensors ``add`` is given (the base's single read) before anything
    is written to it; :class:`BaseMismatch` where it differs."""

    def __init__(self, plan, layout, live: Dict[str, torch.Tensor], device, check_base: bool = False):
        self.plan, self.layout, self.live, self.device = plan, layout, live, device
        self.check_base = check_base
        self.inplace: List[InPlace] = []
        self.reload: List[Reload] = []
        self._pending: Dict[str, _Pending] = {}
        self._remaining = {p: set(cs) for p, cs in plan.inplace.items()}
        self._targets: Dict[str, List[str]] = {}
        for p, cs in plan.inplace.items():
            for c in cs:
                self._targets.setdefault(c, []).append(p)

    def add(self, task, base: torch.Tensor, sources: List[Any], read_base: Callable[[], torch.Tensor]) -> None:
        if self.plan.route(task.name) == "reload":
            self.reload.append(self._reload_entry(task, base, sources, read_base))
            return
        for pname in self._targets.get(task.name, []):
            self._replay(pname, task.name, base, sources)
            self._remaining[pname].discard(task.name)
            if not self._remaining[pname]:
                self.inplace.append(self._finish(pname, task))

    def check_complete(self) -> None:
        if self._pending:  # cannot happen with mergekit's plans
            raise RuntimeError(f"hot-swap: incomplete parameters {sorted(self._pending)}")

    def _reload_entry(self, task, base, sources, read_base) -> Reload:
        from vllm_plugins.layout import rank_positions

        # (only when every loader copy came straight from a checkpoint view)
        fed = not self.layout.stray and any(task.name in pl.checkpoints for pl in self.layout.params.values())
        cover = rank_positions(self.layout, task.name, base.shape) if fed else None
        if cover is not None:  # keep only what this rank's shard reads
            cover = cover.to(base.device)
            base, sources = base.reshape(-1)[cover], [_restrict(v, cover) for v in sources]
        store = packed.pack(base, sources).to(self.device)
        bits = None if cover is None else packed.pack_bits(cover).to(self.device)
        return Reload(task.name, store, task.save_dtype, list(task.slots), read_base, bits)

    def _replay(self, pname: str, checkpoint: str, base, sources) -> None:
        from vllm_plugins.layout import only

        pl = self.layout.params[pname]
        fused = len(pl.checkpoints) > 1
        entry = self._pending.get(pname)
        if entry is None:  # built where the sources were computed (parts.work_device)
            live, where = self.live[pname].detach(), base.device
            entry = self._pending[pname] = _Pending(live.to(device=where, dtype=base.dtype, copy=True))
            for v in sources:
                recompute = isinstance(v, RecomputedVector)
                entry.models.append(torch.zeros_like(entry.base) if recompute else None)
                entry.masks.append(torch.zeros(entry.base.shape, dtype=torch.bool, device=where))
                work = torch.float64 if base.dtype == torch.float64 else torch.float32
                need = fused or not recompute
                entry.explicit.append(torch.zeros(entry.base.shape, dtype=work, device=where) if need else None)
                entry.scales.append(set())
                entry.recompute.append(recompute)
        single = only(pl, checkpoint)
        single.replay({checkpoint: base}, entry.base)
        for j, v in enumerate(sources):
            recompute = isinstance(v, RecomputedVector)
            mask = v.mask if recompute and v.mask is not None else torch.ones(base.shape, dtype=torch.bool,
                                                                               device=base.device)
            single.replay({checkpoint: mask}, entry.masks[j])
            if recompute:
                single.replay({checkpoint: v.model}, entry.models[j])
                entry.scales[j].add(v.scale)
            if entry.explicit[j] is not None:
                single.replay({checkpoint: v.values(base) if recompute else v}, entry.explicit[j])

    def _finish(self, pname: str, task) -> InPlace:
        entry = self._pending.pop(pname)
        vectors = []
        for j in range(len(entry.masks)):
            if entry.recompute[j] and len(entry.scales[j]) == 1:
                vectors.append(RecomputedVector(entry.models[j], entry.masks[j], next(iter(entry.scales[j]))))
            else:  # fused tensors with different gammas (dots rescale: tensor), or sar's explicit delta
                vectors.append(MaskedVector(entry.masks[j], entry.explicit[j]))
        param = self.live[pname]
        if self.check_base and not torch.equal(entry.base.to(param.dtype), param.detach().to(entry.base.device)):
            raise BaseMismatch(f"parameter {pname} does not hold the base as vLLM's loaders put it")
        store = packed.pack(entry.base, vectors).to(self.device)
        param.data.copy_(_save(entry.base, task.save_dtype))  # entries no vector changes: the base, once
        return InPlace(pname, param, store, task.save_dtype, list(task.slots))


def _restrict(vector, cover: torch.Tensor):
    """A vector at the flat entries ``cover`` (bool), as a 1-D vector of the same kind."""
    if isinstance(vector, RecomputedVector):
        mask = None if vector.mask is None else vector.mask.reshape(-1)[cover]
        return RecomputedVector(vector.model.reshape(-1)[cover], mask, vector.scale)
    return vector.reshape(-1)[cover]


def held_bytes(inplace: List[InPlace], reload: List[Reload]) -> Dict[str, int]:
    """Every byte the swap holds (beyond vLLM's weights), and its parts."""
    stores = [e.store for e in inplace] + [e.store for e in reload]
    cover = sum(e.cover.numel() for e in reload if e.cover is not None)
    base = sum(s.base_nbytes for s in stores) + cover
    vectors = sum(s.vector_nbytes for s in stores)
    work = {True: 8, False: 4}
    dense = sum(s.numel * work[s.dtype == torch.float64] * len(s.vectors) for s in stores)
    weights = sum(s.numel * _save(torch.empty(0, dtype=s.dtype), e.save_dtype).element_size()
                  for e, s in zip(inplace + reload, stores))
    return {"bytes": base + vectors, "base_bytes": base, "vector_bytes": vectors, "vector_dense_bytes": dense,
            "weight_bytes": weights}
