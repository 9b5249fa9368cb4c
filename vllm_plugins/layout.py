"""Where each checkpoint tensor lands in vLLM's parameters, learned from vLLM itself.

vLLM's loaders fuse checkpoint tensors (q/k/v -> ``qkv_proj``, gate/up ->
``gate_up_proj``), take this worker's tensor-parallel shard, pad vocabularies.
Rather than re-implementing that per architecture, :func:`record_layout` runs the
model's own ``load_weights`` once on stand-in parameters that live on the meta
device (built from the metadata vLLM records for reloading, so they have the
pre-processing shapes and loaders) and watches every ``copy_`` the loaders make
from our checkpoint-shaped tensors. Each copy is kept as a pair of view
geometries (destination in the parameter, source in the checkpoint tensor), so
:meth:`ParamLayout.replay` maps any checkpoint-format tensor (a base, a vector, a
mask) into the parameter's layout with exactly the loaders' slicing. Nothing is
written to the live parameters while recording.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Geometry = Tuple[Tuple[int, ...], Tuple[int, ...], int]  # size, stride, storage offset


@dataclass
class Copy:
    checkpoint: str
    dst: Geometry
    src: Geometry


@dataclass
class ParamLayout:
    """How checkpoint tensors fill one vLLM parameter (pre-processing shape)."""

    name: str
    shape: Tuple[int, ...]
    copies: List[Copy] = field(default_factory=list)

    @property
    def checkpoints(self) -> List[str]:
        return sorted({c.checkpoint for c in self.copies})

    def replay(self, tensors: Dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy ``tensors`` (checkpoint name -> checkpoint-shaped, contiguous) into
        ``out`` (this parameter's shape) exactly as vLLM's loaders place them."""
        for c in self.copies:
            src = tensors[c.checkpoint]
            if not src.is_contiguous():
                src = src.contiguous()
            out.as_strided(*c.dst).copy_(src.as_strided(*c.src))
        return out


@dataclass
class Layout:
    params: Dict[str, ParamLayout]  # vLLM parameter name -> layout
    error: Optional[str] = None  # why recording failed, if it did
    stray: int = 0  # copies into parameters from something other than a checkpoint view


def _geometry(t: torch.Tensor) -> Geometry:
    return tuple(t.size()), tuple(t.stride()), int(t.storage_offset())


class _Recorder(TorchDispatchMode):
    def __init__(self, sources: Dict[int, str]):
        super().__init__()
        self.sources = sources  # storage data_ptr -> checkpoint name
        self.current: Optional[str] = None
        self.copies: Dict[str, List[Copy]] = {}
        self.stray = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and args[0].is_meta:
            dst, src = args[0], args[1]
            name = None
            if isinstance(src, torch.Tensor) and not src.is_meta:
                name = self.sources.get(src.untyped_storage().data_ptr())
            if name is not None and self.current is not None:
                self.copies.setdefault(self.current, []).append(Copy(name, _geometry(dst), _geometry(src)))
            else:
                self.stray += 1
            return dst
        return func(*args, **kwargs)


def _stand_in(template: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    from vllm.model_executor.model_loader.reload.meta import to_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    stand = to_meta_tensor(template)
    return restore_layer_refs(stand, layer)


def record_layout(model: torch.nn.Module, checkpoint: Iterable[Tuple[str, torch.Size, torch.dtype]]) -> Layout:
    """Run ``model.load_weights`` on meta stand-ins; see the module docstring."""
    from vllm_plugins.vllm_compat import layerwise_reload

    LAYERWISE_INFO, _get_original_loader = layerwise_reload()

    checkpoint = list(checkpoint)
    # uninitialized real tensors: their storage identifies them, their pages are never touched
    sources = {name: torch.empty(tuple(shape), dtype=dtype) for name, shape, dtype in checkpoint}
    recorder = _Recorder({t.untyped_storage().data_ptr(): n for n, t in sources.items()})

    saved: Dict[torch.nn.Module, Dict[str, torch.Tensor]] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    prefixes = {module: prefix for prefix, module in model.named_modules(remove_duplicate=False)}
    try:
        for module, prefix in prefixes.items():
            if module in saved or not module._parameters:
                continue
            saved[module] = dict(module._parameters)
            info = LAYERWISE_INFO.get(module)
            templates = dict(info.restore_metadata[0]) if info is not None else {}
            for pname, live in module._parameters.items():
                if live is None:
                    continue
                template = templates.get(pname, live)
                stand = _stand_in(template, module)
                qualified = f"{prefix}.{pname}" if prefix else pname
                shapes[qualified] = tuple(stand.shape)
                # vLLM's layerwise reload wraps the recorded parameters' loaders; unwrap
                original = _get_original_loader(stand)
                stand.weight_loader = _tracking(original, recorder, qualified)
                module._parameters[pname] = stand
        with torch.no_grad(), recorder:
            model.load_weights(iter(sources.items()))
        error = None
    except Exception as exc:  # any loader surprise: everything goes through reload
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for module, params in saved.items():
            module._parameters.clear()
            module._parameters.update(params)
    if error is not None:
        return Layout({}, error)
    params = {
        name: ParamLayout(name, shapes[name], copies) for name, copies in recorder.copies.items()
    }
    return Layout(params, stray=recorder.stray)


def _tracking(loader, recorder: _Recorder, name: str):
    @functools.wraps(loader)
    def tracked(*args, **kwargs):
        previous, recorder.current = recorder.current, name
        try:
            return loader(*args, **kwargs)
        finally:
            recorder.current = previous

    return tracked


def only(pl: ParamLayout, checkpoint: str) -> ParamLayout:
    """The copies of one checkpoint tensor into a parameter."""
    return ParamLayout(pl.name, pl.shape, [c for c in pl.copies if c.checkpoint == checkpoint])


def _covered(layout: Layout, checkpoint: str, shape) -> torch.Tensor:
    covered = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool)
    for pl in layout.params.values():
        for c in pl.copies:
            if c.checkpoint == checkpoint:
                covered.as_strided(*c.src).fill_(True)
    return covered


def rank_positions(layout: Layout, checkpoint: str, shape) -> Optional[torch.Tensor]:
    """Flat bool mask of the entries of ``checkpoint`` this rank's loaders copy from,
    or None when they read all of it (one rank, replicated tensors)."""
    covered = _covered(layout, checkpoint, shape)
    return None if bool(covered.all()) else covered


def read_box(layout: Layout, checkpoint: str, shape) -> Optional[Tuple[slice, ...]]:
    """The smallest box (one slice per dimension) holding every entry of
    ``checkpoint`` this rank's loaders copy from: what this rank needs to read of it
    (a column-parallel shard: a block of rows; row-parallel: a block of columns).
    None: all of it, or a layout that cannot tell (a failed recording, copies from
    something other than a checkpoint view, a tensor no loader reads)."""
    if layout.error is not None or layout.stray or not shape:
        return None
    covered = _covered(layout, checkpoint, shape).view(tuple(shape))
    if not bool(covered.any()) or bool(covered.all()):
        return None
    box = []
    for dim in range(covered.dim()):
        others = [d for d in range(covered.dim()) if d != dim]
        used = (covered.any(dim=others) if others else covered).nonzero().squeeze(1)
        box.append(slice(int(used[0]), int(used[-1]) + 1))
    if all(b.stop - b.start == n for b, n in zip(box, shape)):
        return None
    return tuple(box)


def expand(part: torch.Tensor, shape, box: Optional[Tuple[slice, ...]]) -> torch.Tensor:
    """``part`` (the ``box`` of a tensor of ``shape``) in a tensor of ``shape``, zeros
    elsewhere: entries no copy of this rank reads, so never used."""
    if box is None:
        return part
    out = part.new_zeros(tuple(shape))
    out[box] = part
    return out
