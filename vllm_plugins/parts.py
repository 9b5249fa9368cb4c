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

Where the engine runs on an accelerator, an elementwise method's vectors of a tensor
are computed on it (:func:`work_device`) when its free memory holds the build's
working set for that tensor; the rest of the build (layout replay, the base check,
packing) then runs there too, and only the packed result stays. Elsewhere, and for the
tensors too large for what vLLM left free (its KV cache is sized first), on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from vllm_plugins.layout import Layout, expand, read_box

Box = Tuple[slice, ...]


#: the build's working set on the device, per entry of the largest tensor it holds for
#: one checkpoint tensor (the checkpoint tensor or a fused parameter it fills): the
#: inputs and the base in float32, and per vector its tau, mask, support and replayed
#: copies (bytes; generous: packing's own temporaries are smaller than these)
WORK_BYTES, WORK_BYTES_PER_VECTOR = 12, 16
#: left free on the device beyond the working set (the allocator's rounding, vLLM's own)
WORK_MARGIN = 256 << 20


def work_device(device: Optional[torch.device], entries: int, vectors: int,
                free: Callable[[torch.device], int]) -> Optional[torch.device]:
    """Where a rank computes one tensor's vectors: ``device`` (the engine's) when it is
    an accelerator whose ``free(device)`` bytes hold the working set of ``entries``
    entries and ``vectors`` vectors with :data:`WORK_MARGIN` to spare, else None (the
    host)."""
    if device is None or device.type == "cpu":
        return None
    need = entries * (WORK_BYTES + WORK_BYTES_PER_VECTOR * vectors) + WORK_MARGIN
    return device if need <= free(device) else None


def free_bytes(device: torch.device) -> int:
    """The device's free memory as its driver reports it."""
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 0


@dataclass
class Parts:
    boxes: Dict[str, Optional[Box]]  # checkpoint tensor -> box this rank reads (None: all)
    infos: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]  # checkpoint tensor -> (shape, dtype) of the base
    entries: Dict[str, int] = field(default_factory=dict)  # checkpoint tensor -> largest tensor its build holds
    device: Optional[torch.device] = None  # the engine's (vectors computed there where they fit)
    free: Callable[[torch.device], int] = free_bytes

    @classmethod
    def of(cls, layout: Layout, infos: Dict[str, Tuple[Tuple[int, ...], torch.dtype]],
           device: Optional[torch.device] = None) -> "Parts":
        entries = {name: math.prod(shape) for name, (shape, _) in infos.items()}
        for pl in layout.params.values():
            for name in pl.checkpoints:
                if name in entries:
                    entries[name] = max(entries[name], math.prod(pl.shape))
        return cls({name: read_box(layout, name, shape) for name, (shape, _) in infos.items()}, dict(infos),
                   entries, device)

    def base(self, d, task) -> torch.Tensor:
        """The base's tensor as its checkpoint stores it, read inside this rank's box."""
        shape, box = self.infos[task.name][0], self.boxes.get(task.name)
        return expand(d.base_tensor(task, box), shape, box)

    def sources(self, d, task) -> Tuple[torch.Tensor, List[Any]]:
        """``d.sources(task)`` with every entry inside this rank's box exact, on the device
        :func:`work_device` chooses (where the method is elementwise)."""
        shape = self.infos[task.name][0]
        where = work_device(self.device, self.entries.get(task.name, 0), len(task.slots), self.free)
        base, vectors, box = d.sources_part(task, self.boxes.get(task.name), where)
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
