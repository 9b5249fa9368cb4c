"""Worker extension that keeps a recipe's fixed vectors beside the weights and
rewrites the weights as ``base + sum_j c_j v_j`` when coefficients change.

Pass ``worker_extension_cls="vllm_plugins.worker.HotSwapWorkerExtension"`` to
``vllm.LLM`` (HotSwapLLM does) and call the RPCs with ``LLM.collective_rpc``:

- ``hotswap_load(spec)``: ``spec = {"recipe": dict (absolute model paths),
  "coefficients": [..] or None, "paths": "auto" | "reload"}``. Computes the
  vectors on this worker (mergekit_rlvr.decompose), maps them to this worker's
  tensor-parallel shard and fused layout, and applies the coefficients.
- ``hotswap_set(coefficients)``: list in coefficient-name order.
- ``hotswap_state()``: method, names, coefficients, version, bytes, paths.
- ``hotswap_read(names)``: copies of live parameters (plain ones) for checks.

Two paths, chosen per vLLM module and reported per parameter:

- ``inplace``: the live parameter is a plain tensor holding exactly what vLLM's
  loaders put there (checked against the base at load time). Base and vectors are
  pre-mapped into its layout (``qkv_proj``, ``gate_up_proj``, this rank's shard,
  see :mod:`vllm_plugins.layout`) and the merged value is written into it.
- ``reload``: vLLM transformed the weights after loading (CPU repacks linear
  layers, quantized layers): the merged checkpoint-format tensors go through
  vLLM's layerwise reload (``model_loader/reload``), which re-runs the loaders
  and ``process_weights_after_loading`` and copies into the kernel tensors.

Both paths compute ``combine(base, vectors, c, out_dtype=merge dtype)`` then cast
to the dtype mergekit writes, then to the parameter's dtype: the same values a
fresh engine loads from the ``mergekit-yaml`` output. Every swap recomputes from
the stored base (no accumulation).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

LOG = logging.getLogger("vllm.mergekit_rlvr.hotswap")  # under vLLM's configured logger


@dataclass
class _InPlace:
    name: str  # vLLM parameter name
    param: torch.Tensor  # the live parameter
    base: torch.Tensor  # merge dtype, parameter layout
    vectors: List[Any]  # packed.Stored, parameter layout
    save_dtype: Optional[torch.dtype]
    slots: List[int]  # per vector: the index of its coefficient (search.groups)


@dataclass
class _Reload:
    name: str  # checkpoint tensor name
    base: torch.Tensor  # merge dtype, checkpoint layout (or the entries at ``index``)
    vectors: List[Any]
    save_dtype: Optional[torch.dtype]
    slots: List[int]
    index: Optional[torch.Tensor] = None  # flat positions this rank's loaders read (tensor parallel)
    shape: Optional[torch.Size] = None

    def tensor(self, values: List[float]) -> torch.Tensor:
        merged = _combine(self.base, self.vectors, [values[i] for i in self.slots], self.save_dtype)
        if self.index is None:
            return merged
        # the loaders read only this rank's entries; the rest is never looked at
        full = torch.zeros(self.shape, dtype=merged.dtype, device=merged.device)
        full.view(-1)[self.index] = merged
        return full


@dataclass
class _State:
    method: str
    names: List[str]
    coefficients: List[float]
    inplace: List[_InPlace] = field(default_factory=list)
    reload: List[_Reload] = field(default_factory=list)
    paths: Dict[str, str] = field(default_factory=dict)
    version: int = 0
    load_seconds: float = 0.0
    layout_error: Optional[str] = None
    layout_stray: int = 0


@contextlib.contextmanager
def _quiet(*names):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _combine(base, stored, coefficients, save_dtype):
    """combine(base, vectors, c, out_dtype=merge dtype), then the dtype mergekit writes."""
    from vllm_plugins.packed import combine_stored

    out = combine_stored(base, stored, coefficients, out_dtype=base.dtype)
    return out.to(save_dtype) if save_dtype is not None and save_dtype != out.dtype else out


class HotSwapWorkerExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls``."""

    _hotswap: Optional[_State] = None

    # -- helpers -------------------------------------------------------------
    def _hs_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def _hs_state(self) -> _State:
        if self._hotswap is None:
            raise RuntimeError("hotswap_load has not been called on this worker")
        return self._hotswap

    # -- RPCs ------------------------------------------------------------------
    def hotswap_load(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        previous = self._hotswap
        try:
            return self._hs_load(spec)
        except BaseException:
            if previous is not None and self._hotswap is previous:
                self.hotswap_set(previous.coefficients)  # the weights as they were
            raise

    def _hs_load(self, spec: Dict[str, Any]) -> Dict[str, Any]:
        from mergekit_rlvr.decompose import decompose

        from vllm_plugins import packed
        from vllm_plugins.layout import record_layout

        start = time.perf_counter()
        force_reload = spec.get("paths", "auto") == "reload"
        if self._hotswap is not None:
            # back to the base weights, so the new recipe's base check sees what vLLM loaded
            self.hotswap_set([0.0] * len(self._hotswap.names))
        d = decompose(spec["recipe"], trust_remote_code=bool(spec.get("trust_remote_code", False)))
        d.prepare()
        model = self._hs_model()
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        live = dict(model.named_parameters(remove_duplicate=False))

        # 1. where vLLM's loaders put each checkpoint tensor (this rank's shard, fused)
        bases = {task.name: d.base_tensor(task) for task in d.tasks}
        slots = {task.name: list(task.slots) for task in d.tasks}
        layout = record_layout(model, [(n, b.shape, b.dtype) for n, b in bases.items()])
        by_checkpoint: Dict[str, List[str]] = {}
        for pname, pl in layout.params.items():
            for c in pl.checkpoints:
                by_checkpoint.setdefault(c, []).append(pname)

        # 2. which parameters hold checkpoint-equivalent values (base check)
        plain: Dict[str, bool] = {}
        for pname, pl in layout.params.items():
            p = live.get(pname)
            ok = (
                not force_reload
                and p is not None
                and not p.is_meta
                and p.is_floating_point()
                and tuple(p.shape) == tuple(pl.shape)
            )
            if ok:
                expect = pl.replay({c: bases[c] for c in pl.checkpoints}, p.detach().clone())
                ok = torch.equal(expect, p.detach())
            # one coefficient per vector for the whole parameter (fused tensors of one group)
            plain[pname] = ok and len({tuple(slots[c]) for c in pl.checkpoints}) == 1
        modules: Dict[str, bool] = {}
        named = dict(model.named_modules(remove_duplicate=False))
        for pname, ok in plain.items():
            mod = _module_of(pname)
            modules[mod] = modules.get(mod, True) and ok and _no_derived_weights(named.get(mod))
        del bases
        # a checkpoint tensor feeding a reload module sends every module it feeds to reload
        changed = True
        while changed:
            changed = False
            for targets in by_checkpoint.values():
                mods = {_module_of(p) for p in targets}
                if len(mods) > 1 and not all(modules.get(m, False) for m in mods):
                    for m in mods:
                        if modules.get(m, False):
                            modules[m] = False
                            changed = True

        def inplace_param(pname: str) -> bool:
            return modules.get(_module_of(pname), False)

        # 3. vectors: pre-mapped for in-place parameters, checkpoint layout for reload
        from mergekit_rlvr.decompose import names_as_written

        state = _State(method=d.method, names=names_as_written(d.coefficient_names, spec.get("aliases") or {}),
                       coefficients=list(d.coefficients))
        state.layout_error = layout.error
        state.layout_stray = layout.stray
        pending: Dict[str, Dict[str, Any]] = {}
        remaining = {p: set(pl.checkpoints) for p, pl in layout.params.items()}
        for task, base, vectors in d.iter_tensors(progress=True):
            targets = by_checkpoint.get(task.name, [])
            if not targets or not all(inplace_param(p) for p in targets):
                # (only when every loader copy came straight from a checkpoint view)
                index = _rank_positions(layout, task.name, base.shape) if targets and not layout.stray else None
                if index is not None:  # keep only what this rank's shard reads
                    shape = base.shape
                    base, vectors = _restrict(base, vectors, index)
                state.reload.append(
                    _Reload(task.name, base.to(device), [packed.store(v, base).to(device) for v in vectors],
                            task.save_dtype, list(task.slots), None if index is None else index.to(device),
                            None if index is None else shape)
                )
                for p in targets:
                    state.paths[p] = "reload"
                continue
            for pname in targets:
                pl = layout.params[pname]
                entry = pending.get(pname)
                if entry is None:
                    p = live[pname]
                    entry = pending[pname] = {
                        "base": p.detach().to(base.dtype, copy=True).cpu(),
                        "dense": [torch.zeros(pl.shape, dtype=_vec_dtype(v)) for v in vectors],
                        "mask": [torch.zeros(pl.shape, dtype=torch.bool) if _is_sparse(v) else None
                                 for v in vectors],
                        "save": task.save_dtype,
                        "slots": list(task.slots),
                    }
                single = _only(pl, task.name)
                single.replay({task.name: base}, entry["base"])
                for j, v in enumerate(vectors):
                    if _is_sparse(v):
                        single.replay({task.name: v.dense()}, entry["dense"][j])
                        single.replay({task.name: v.mask}, entry["mask"][j])
                    else:
                        single.replay({task.name: v}, entry["dense"][j])
                remaining[pname].discard(task.name)
                if not remaining[pname]:
                    entry = pending.pop(pname)
                    stored = []
                    for dense, mask in zip(entry["dense"], entry["mask"]):
                        if mask is None:
                            stored.append(dense.to(device))
                        else:
                            from mergekit_rlvr.methods.common import SparseVector

                            stored.append(packed.store(SparseVector(mask, dense[mask]), entry["base"]).to(device))
                    state.inplace.append(_InPlace(pname, live[pname], entry["base"].to(device), stored, entry["save"],
                                                  entry["slots"]))
                    state.paths[pname] = "inplace"
        if pending:  # a parameter whose checkpoint tensors were not all planned: cannot happen with mergekit plans
            raise RuntimeError(f"hot-swap: incomplete parameters {sorted(pending)}")
        if self._hotswap is not None:
            state.version = self._hotswap.version
        self._hotswap = state
        state.load_seconds = time.perf_counter() - start
        report = self.hotswap_state()
        LOG.info(
            "hot-swap %s: %d parameters in place, %d checkpoint tensors through reload_weights; vectors %.1f MB",
            d.method, len(state.inplace), len(state.reload), report["vector_bytes"] / 1e6,
        )
        for pname, path in sorted(state.paths.items()):
            LOG.info("hot-swap path %s: %s", pname, path)
        coefficients = spec.get("coefficients")
        timing = self.hotswap_set(list(d.coefficients) if coefficients is None else list(coefficients))
        report = self.hotswap_state()
        report["set"] = timing
        return report

    def hotswap_set(self, coefficients: List[float]) -> Dict[str, Any]:
        state = self._hs_state()
        values = [float(c) for c in coefficients]
        if len(values) != len(state.names) or not all(math.isfinite(c) for c in values):
            raise ValueError(f"hotswap_set: expected {len(state.names)} finite coefficients, got {coefficients!r}")
        start = time.perf_counter()
        reload_seconds = 0.0
        with torch.no_grad():
            if state.reload:
                reload_seconds = self._hs_reload(state, values)
            t_inplace = time.perf_counter()
            for entry in state.inplace:
                merged = _combine(entry.base, entry.vectors, [values[i] for i in entry.slots], entry.save_dtype)
                entry.param.data.copy_(merged)
            inplace_seconds = time.perf_counter() - t_inplace
        for reset in ("reset_encoder_cache", "reset_mm_cache"):
            fn = getattr(self.model_runner, reset, None)
            if fn is not None:
                try:
                    fn()
                except Exception:  # caches that do not exist on this runner
                    pass
        state.coefficients = values
        state.version += 1
        return {
            "seconds": time.perf_counter() - start,
            "reload_seconds": reload_seconds,
            # of which computing base + sum c_j v_j (the rest is vLLM's loaders and repacking)
            "reload_combine_seconds": getattr(self, "_hs_combine_seconds", 0.0) if state.reload else 0.0,
            "inplace_seconds": inplace_seconds,
            "version": state.version,
        }

    def _hs_reload(self, state: _State, values: List[float]) -> float:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        start = time.perf_counter()
        model = self._hs_model()

        spent = [0.0]

        def weights():
            for entry in state.reload:
                t = time.perf_counter()
                tensor = entry.tensor(values)
                spent[0] += time.perf_counter() - t
                yield entry.name, tensor

        with set_current_vllm_config(self.vllm_config), _quiet(
            "vllm.model_executor.model_loader.reload.layerwise",
            "vllm.model_executor.model_loader.reload.inplace",
        ):
            initialize_layerwise_reload(model)
            model.load_weights(weights())
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        self._hs_combine_seconds = spent[0]
        return time.perf_counter() - start

    def hotswap_state(self) -> Dict[str, Any]:
        from vllm_plugins import packed

        state = self._hotswap
        if state is None:
            return {"loaded": False}
        vec = sum(packed.nbytes(v) for e in state.inplace + state.reload for v in e.vectors)
        dense = sum(packed.dense_nbytes(v) for e in state.inplace + state.reload for v in e.vectors)
        base = sum(e.base.numel() * e.base.element_size() for e in state.inplace + state.reload)
        return {
            "loaded": True,
            "method": state.method,
            "names": list(state.names),
            "coefficients": list(state.coefficients),
            "version": state.version,
            "vector_bytes": vec,
            "vector_dense_bytes": dense,
            "base_bytes": base,
            "bytes": vec + base,
            "inplace": sorted(e.name for e in state.inplace),
            "reload": [e.name for e in state.reload],
            "paths": dict(state.paths),
            "layout_error": state.layout_error,
            "layout_stray_copies": state.layout_stray,
            "reload_rank_restricted": sum(e.index is not None for e in state.reload),
            "load_seconds": state.load_seconds,
        }

    def hotswap_read(self, names: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
        """Copies of live parameters that are plain tensors (not repacked)."""
        out = {}
        for name, p in self._hs_model().named_parameters(remove_duplicate=False):
            if names is not None and name not in names:
                continue
            if p.is_meta or p.numel() == 0:
                continue
            out[name] = encode_tensor(p.detach())
        return out


def encode_tensor(t: torch.Tensor) -> Dict[str, Any]:
    """A tensor as plain data that survives vLLM's RPC serialization."""
    t = t.cpu().contiguous()
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "data": t.view(-1).view(torch.uint8).numpy().tobytes()}


def decode_tensor(d: Dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    raw = torch.frombuffer(bytearray(d["data"]), dtype=torch.uint8)
    return raw.view(dtype).reshape(d["shape"]).clone()


def _no_derived_weights(module) -> bool:
    """True when the module computes with its parameters as loaded. A layer with a
    quantization method keeps derived copies on some platforms (the CPU backend
    packs linear and lm_head weights for oneDNN/sgl kernels; quantized methods
    repack): only unquantized methods on CUDA-like platforms, whose
    ``process_weights_after_loading`` leaves the weight alone, qualify."""
    if module is None:
        return False
    method = getattr(module, "quant_method", None)
    if method is None:
        return True
    from vllm.platforms import current_platform

    unquantized = type(method).__name__ in ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")
    return unquantized and current_platform.is_cuda_alike()


def _rank_positions(layout, checkpoint: str, shape) -> Optional[torch.Tensor]:
    """Flat positions of ``checkpoint`` that this rank's loaders copy from, or None
    when they read all of it (one rank, replicated tensors)."""
    covered = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool)
    for pl in layout.params.values():
        for c in pl.copies:
            if c.checkpoint == checkpoint:
                covered.as_strided(*c.src).fill_(True)
    if bool(covered.all()):
        return None
    return covered.nonzero().squeeze(1)


def _restrict(base, vectors, index):
    """base and vectors at the flat positions ``index`` (1-D, same order)."""
    from mergekit_rlvr.methods.common import SparseVector

    flat_base = base.reshape(-1)[index]
    out = []
    for v in vectors:
        if isinstance(v, SparseVector):
            mask = v.mask.reshape(-1)
            selected = torch.zeros_like(mask)
            selected[index] = True
            keep = selected[mask]  # kept entries, in row-major order, that this rank reads
            out.append(SparseVector(mask[index], v.values[keep]))
        else:
            out.append(v.reshape(-1)[index])
    return flat_base, out


def _is_sparse(v) -> bool:
    from mergekit_rlvr.methods.common import SparseVector

    return isinstance(v, SparseVector)


def _vec_dtype(v) -> torch.dtype:
    return v.values.dtype if _is_sparse(v) else v.dtype


def _only(pl, checkpoint: str):
    from vllm_plugins.layout import ParamLayout

    return ParamLayout(pl.name, pl.shape, [c for c in pl.copies if c.checkpoint == checkpoint])
