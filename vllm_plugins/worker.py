"""Worker extension that keeps a recipe's fixed vectors beside the weights and
rewrites the weights as ``base + sum_j c_j v_j`` when coefficients change.

Pass ``worker_extension_cls="vllm_plugins.worker.HotSwapWorkerExtension"`` to
``vllm.LLM`` (HotSwapLLM does) and call the RPCs with ``LLM.collective_rpc``:

- ``hotswap_load(spec)``: ``spec`` an :class:`vllm_plugins.rpc.LoadRequest` (the
  recipe with absolute model paths, coefficients or None, ``paths`` "auto" |
  "reload", ``offload``, the driver's pre-pass ``prepared``). Computes the vectors on
  this worker (mergekit_rlvr.decompose) from the part of each checkpoint tensor its
  shard needs (:mod:`vllm_plugins.parts`), maps them to this worker's tensor-parallel
  shard and fused layout, keeps them packed, and applies the coefficients.
- ``hotswap_set(coefficients)``: list in coefficient-name order.
- ``hotswap_state()``: method, names, coefficients, version, bytes, paths, reads.
- ``hotswap_read(names)``: copies of live parameters (plain ones) for checks.

Two paths, chosen per vLLM module and reported per parameter:

- ``inplace``: the live parameter is a plain tensor holding exactly what vLLM's
  loaders put there (checked against the base at load time). Base and vectors are
  pre-mapped into its layout (``qkv_proj``, ``gate_up_proj``, this rank's shard,
  see :mod:`vllm_plugins.layout`) and the merged value is written into it.
- ``reload``: vLLM transformed the weights after loading (CPU repacks linear
  layers, quantized layers): the merged checkpoint-format tensors go through
  vLLM's public ``Worker.reload_weights(weights_iterator=...)``, which re-runs the
  loaders and ``process_weights_after_loading`` and copies into the kernel tensors.

The RPC contract (names, request and reply types, the coefficient validator) is
:mod:`vllm_plugins.rpc`; which parameter goes which way is decided by the pure
planner :mod:`vllm_plugins.plan`; what is held, in the exact compact formats of
:mod:`vllm_plugins.packed`, and the swap on it are :mod:`vllm_plugins.stores`.
Both paths compute ``combine(base, vectors, c, out_dtype=merge dtype)`` then cast
to the dtype mergekit writes, then to the parameter's dtype: the same values a
fresh engine loads from the ``mergekit-yaml`` output. Every swap recomputes from
the stored base (no accumulation).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from vllm_plugins import rpc
from vllm_plugins.rpc import decode_tensor, encode_tensor  # noqa: F401  (the contract's encoding)
from vllm_plugins.stores import BaseMismatch, Builder, held_bytes, swap_all

LOG = logging.getLogger("vllm.mergekit_rlvr.hotswap")  # under vLLM's configured logger
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace")


@dataclass
class _State:
    method: str
    names: List[str]
    coefficients: List[float]
    inplace: List[Any] = field(default_factory=list)  # stores.InPlace
    reload: List[Any] = field(default_factory=list)  # stores.Reload
    paths: Dict[str, str] = field(default_factory=dict)
    version: int = 0
    load_seconds: float = 0.0
    layout_error: Optional[str] = None
    layout_stray: int = 0
    combine_seconds: float = 0.0
    offload: bool = False  # base and vectors in (pinned) host memory, streamed per swap
    reads: Dict[str, Any] = field(default_factory=dict)  # parts.Parts.reads: what this rank read to load


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


class HotSwapWorkerExtension:
    """Mixed into vLLM's worker class by ``worker_extension_cls``."""

    _hotswap: Optional[_State] = None

    def _hs_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def _hs_state(self) -> _State:
        if self._hotswap is None:
            raise RuntimeError("hotswap_load has not been called on this worker")
        return self._hotswap

    # -- RPCs ------------------------------------------------------------------
    def hotswap_load(self, spec: rpc.LoadRequest) -> rpc.StateReply:
        previous = self._hotswap
        try:
            return self._hs_load(spec)
        except BaseException:
            if previous is not None and self._hotswap is previous:
                self.hotswap_set(previous.coefficients)  # the weights as they were
            raise

    def _hs_load(self, spec: rpc.LoadRequest) -> rpc.StateReply:
        from mergekit_rlvr.decompose import decompose, names_as_written

        start = time.perf_counter()
        if self._hotswap is not None:
            # back to the base weights, so the new recipe's base check sees what vLLM loaded
            self.hotswap_set([0.0] * len(self._hotswap.names))
        d = decompose(spec["recipe"], trust_remote_code=bool(spec.get("trust_remote_code", False)))
        if spec.get("prepared") is not None:
            d.adopt(spec["prepared"])  # the driver read every checkpoint once already
        prepass = spec.get("prepared") is None
        d.prepare()
        force, offload = spec.get("paths", "auto") == "reload", bool(spec.get("offload", False))
        try:  # the base check on the base the build reads anyway: one read of each checkpoint
            layout, plan, parts = self._hs_plan(d, force, read_bases=False)
            built = self._hs_build(d, layout, plan, parts, offload, check_base=True)
        except BaseMismatch as error:  # a loader changed what it copied: plan after reading the bases
            LOG.info("hot-swap: %s; checking every parameter before planning (the base is read twice)", error)
            layout, plan, parts = self._hs_plan(d, force, read_bases=True)
            built = self._hs_build(d, layout, plan, parts, offload)
        state = _State(method=d.method, names=names_as_written(d.coefficient_names, spec.get("aliases") or {}),
                       coefficients=list(d.coefficients), paths=dict(plan.paths),
                       layout_error=layout.error, layout_stray=layout.stray)
        state.inplace, state.reload = built
        state.offload = offload
        state.reads = parts.reads(d, prepass)
        if self._hotswap is not None:
            state.version = self._hotswap.version
        self._hotswap = state
        state.load_seconds = time.perf_counter() - start
        report = self.hotswap_state()
        LOG.info("hot-swap %s: %d parameters in place, %d checkpoint tensors through reload_weights; holds %.1f MB",
                 d.method, len(state.inplace), len(state.reload), report["bytes"] / 1e6)
        for pname, path in sorted(state.paths.items()):
            LOG.debug("hot-swap path %s: %s", pname, path)
        coefficients = spec.get("coefficients")
        timing = self.hotswap_set(list(d.coefficients) if coefficients is None else list(coefficients))
        report = self.hotswap_state()
        report["set"] = timing
        return report

    def _hs_plan(self, d, force_reload: bool, read_bases: bool):
        """Where vLLM's loaders put each checkpoint tensor (this rank's shard, fused),
        the facts the planner needs, and its plan. ``read_bases``: the base check reads
        the base here (else the build checks, on its own read)."""
        from vllm_plugins.layout import record_layout
        from vllm_plugins.plan import ParamFacts, plan_paths

        from vllm_plugins.parts import Parts

        model = self._hs_model()
        live = dict(model.named_parameters(remove_duplicate=False))
        named = dict(model.named_modules(remove_duplicate=False))
        infos = {task.name: d.base_info(task) for task in d.tasks}  # from the headers: nothing read yet
        slots = {task.name: tuple(task.slots) for task in d.tasks}
        layout = record_layout(model, [(n, shape, dtype) for n, (shape, dtype) in infos.items()])
        parts = Parts.of(layout, infos, _device(model))  # what of each checkpoint tensor this rank reads
        tasks = {task.name: task for task in d.tasks}
        facts = {}
        for pname, pl in layout.params.items():  # one parameter's bases at a time
            module = named.get(pname.rpartition(".")[0])
            own_slots, derived_free = tuple(slots[c] for c in pl.checkpoints), _no_derived_weights(module)
            # only where the parameter could go in place: elsewhere the check would not change the plan
            bases = {c: functools.partial(parts.base, d, tasks[c]) for c in pl.checkpoints} if read_bases else None
            plain = not force_reload and derived_free and len(set(own_slots)) == 1 and _holds_base(
                live.get(pname), pl, bases)
            facts[pname] = ParamFacts(pname, tuple(pl.checkpoints), plain, own_slots, derived_free)
        return layout, plan_paths(facts, d.tensor_names, force_reload), parts

    def _hs_build(self, d, layout, plan, parts, offload: bool = False, check_base: bool = False):
        from tqdm import tqdm

        model = self._hs_model()
        live = dict(model.named_parameters(remove_duplicate=False))
        builder = Builder(plan, layout, live, "pinned" if offload else _device(model), check_base)
        with torch.no_grad():
            for task in tqdm(d.tasks, desc=f"{d.method}: vectors", leave=False):
                base, sources = parts.sources(d, task)
                builder.add(task, base, sources, functools.partial(parts.base, d, task))
        builder.check_complete()
        return builder.inplace, builder.reload

    def hotswap_set(self, coefficients: List[float]) -> rpc.SetReply:
        state = self._hs_state()
        values = rpc.check_values(None, state.names, coefficients)
        start = time.perf_counter()
        reload_seconds = 0.0
        with torch.no_grad():
            if state.reload:
                reload_seconds = self._hs_reload(state, values)
            t_inplace = time.perf_counter()
            swap_all(state.inplace, values)  # one C call for every CPU tensor
            inplace_seconds = time.perf_counter() - t_inplace
        if not state.reload:  # (reload_weights resets them itself)
            for reset in ("reset_encoder_cache", "reset_mm_cache"):
                fn = getattr(self.model_runner, reset, None)
                if fn is not None:
                    with contextlib.suppress(Exception):  # caches that do not exist on this runner
                        fn()
        state.coefficients = values
        state.version += 1
        return {"seconds": time.perf_counter() - start, "reload_seconds": reload_seconds,
                # of which computing base + sum c_j v_j (the rest is vLLM's loaders and repacking)
                "reload_combine_seconds": state.combine_seconds if state.reload else 0.0,
                "inplace_seconds": inplace_seconds, "version": state.version}

    def _hs_reload(self, state: _State, values: List[float]) -> float:
        """vLLM's public ``reload_weights`` on the merged checkpoint-format tensors."""
        start = time.perf_counter()
        spent = [0.0]

        def weights():
            for entry in state.reload:
                t = time.perf_counter()
                tensor = entry.tensor(values)
                spent[0] += time.perf_counter() - t
                yield entry.name, tensor

        with _quiet(*_RELOAD_LOGGERS):
            self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        state.combine_seconds = spent[0]
        return time.perf_counter() - start

    def hotswap_state(self) -> rpc.StateReply:
        state = self._hotswap
        if state is None:
            return {"loaded": False}
        return {
            "loaded": True, "method": state.method, "names": list(state.names),
            "coefficients": list(state.coefficients), "version": state.version,
            **held_bytes(state.inplace, state.reload),
            "inplace": sorted(e.name for e in state.inplace), "reload": [e.name for e in state.reload],
            "paths": dict(state.paths), "layout_error": state.layout_error,
            "layout_stray_copies": state.layout_stray,
            "reload_rank_restricted": sum(e.cover is not None for e in state.reload),
            "load_seconds": state.load_seconds, "rank": int(getattr(self, "rank", 0)), "offload": state.offload,
            "reads": dict(state.reads),
        }

    def hotswap_read(self, names: Optional[List[str]] = None) -> Dict[str, Any]:
        """Copies of live parameters that are plain tensors (not repacked)."""
        out = {}
        for name, p in self._hs_model().named_parameters(remove_duplicate=False):
            if names is not None and name not in names:
                continue
            if p.is_meta or p.numel() == 0:
                continue
            out[name] = encode_tensor(p.detach())
        return out


def _device(model) -> torch.device:
    """The device the engine's weights live on."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def _holds_base(p: Optional[torch.Tensor], pl, bases: Optional[Dict[str, Any]]) -> bool:
    """The live parameter is a plain contiguous floating tensor of its loading shape
    holding exactly what the loaders put there from the base (``bases``: checkpoint
    tensor -> a function reading it, called only when the cheap checks pass; None:
    the cheap checks only, the build compares the values)."""
    if p is None or p.is_meta or not p.is_floating_point() or tuple(p.shape) != tuple(pl.shape):
        return False
    if not p.is_contiguous():
        return False
    if bases is None:
        return True
    expect = pl.replay({c: bases[c]() for c in pl.checkpoints}, p.detach().clone())
    return torch.equal(expect, p.detach())


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
