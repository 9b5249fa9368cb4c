"""What of each checkpoint tensor a tensor-parallel rank reads to load the swap.

vLLM's loaders give each rank a block of rows (column-parallel layers, vocabulary
shards) or of columns (row-parallel layers) of a checkpoint tensor. :func:`Parts.of`
takes, per tensor, the smallest box holding every entry this rank's loaders copy
from (:func:`vllm_plugins.layout.read_box`, learned from vLLM's own loaders), and the
rank reads only that box of the base and of each fine-tuned checkpoint (safetensors
slicing, :func:`mergekit_rlvr.mergekit_compat.read_tensor`) where the method's vectors
are elementwise given the driver's pre-pass (dots with its thresholds and gammas,
task_arithmetic, reasoning_interp: ``elementwise`` on the kernel). Elsewhere (sar's
ranks, dots with per-tensor rescale) it reads whole tensors, as one rank does.

The box is then placed in a zero tensor of the whole shape (:func:`layout.expand`):
the loaders' copies of this rank only read inside the box, so the zeros are never
used, and everything downstream (layout replay, the base check, packing, the reload
path's base) is unchanged. Contract: a tensor of ``shape`` whose entries inside the
box are the checkpoint's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from vllm_plugins.layout import Layout, expand, read_box

Box = Tuple[slice, ...]


@dataclass
class Parts:
    boxes: Dict[str, Optional[Box]]  # checkpoint tensor -> box this rank reads (None: all)
    infos: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]  # checkpoint tensor -> (shape, dtype) of the base

    @classmethod
    def of(cls, layout: Layout, infos: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]) -> "Parts":
        return cls({name: read_box(layout, name, shape) for name, (shape, _) in infos.items()}, dict(infos))

    def base(self, d, task) -> torch.Tensor:
        """The base's tensor as its checkpoint stores it, read inside this rank's box."""
        shape, box = self.infos[task.name][0], self.boxes.get(task.name)
        return expand(d.base_tensor(task, box), shape, box)

    def sources(self, d, task) -> Tuple[torch.Tensor, List[Any]]:
        """``d.sources(task)`` with every entry inside this rank's box exact."""
        shape = self.infos[task.name][0]
        base, vectors, box = d.sources_part(task, self.boxes.get(task.name))
        return expand(base, shape, box), [_expand_vector(v, shape, box) for v in vectors]

    def reads(self, d, prepass: bool) -> Dict[str, Any]:
        """What loading read from the checkpoints (base checks, vectors): ``bytes``, against
        ``whole``: the same reads of whole tensors (what one rank reads); ``boxed``:
        tensors this rank reads in part; ``prepass``: whether this rank ran the method's
        whole-model pre-pass itself (not counted) instead of adopting the driver's."""
        return {"bytes": int(d.read_bytes[0]), "whole": int(d.read_bytes[1]),
                "boxed": sum(b is not None for b in self.boxes.values()), "tensors": len(self.boxes),
                "prepass": bool(prepass)}


def _expand_vector(vector, shape, box: Optional[Box]):
    if box is None:
        return vector
    from mergekit_rlvr.methods.common import RecomputedVector

    if isinstance(vector, RecomputedVector):
        mask = None if vector.mask is None else expand(vector.mask, shape, box)
        return RecomputedVector(expand(vector.model, shape, box), mask, vector.scale)
    if isinstance(vector, torch.Tensor):
        return expand(vector, shape, box)
    raise TypeError(f"hot-swap: no part-read form for {type(vector).__name__}")  # elementwise methods store these two
