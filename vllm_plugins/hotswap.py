"""``HotSwapLLM``: a ``vllm.LLM`` on a recipe's base model whose merge
coefficients can be changed in place (see :mod:`vllm_plugins.worker`).

    llm = HotSwapLLM.from_recipe("recipe.yml", dtype="bfloat16")
    llm.coefficients                     # {"path/to/sft": 0.79, ...}, recipe order
    llm.set_coefficients({"path/to/sft": 0.5, "path/to/rl": 1.5})  # or a list
    llm.generate(prompts, sampling_params)
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from vllm_plugins import WORKER_EXTENSION, rpc


class HotSwapLLM:
    def __init__(self, llm, decomposition, spec: Dict[str, Any], values: Optional[List[float]] = None):
        self.llm = llm
        self._d = decomposition
        self._values = list(decomposition.coefficients) if values is None else values
        self.version = 0
        self._spec = spec
        self.planned_bytes: Optional[Dict[str, int]] = None  # plan.swap_bytes, computed before the engine started
        self.load_reports = self._rpc(rpc.LOAD, spec)
        self.llm.reset_prefix_cache()

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_recipe(
        cls,
        recipe,
        *,
        paths: str = "auto",
        offload: bool = False,
        coefficients: Optional[Union[Dict[str, float], Sequence[float]]] = None,
        groups: Any = None,
        sequences: Optional[int] = None,
        settings_prefix: str = "",
        **llm_kwargs,
    ) -> "HotSwapLLM":
        """Start ``vllm.LLM(model=<base>, **llm_kwargs)`` once and load the recipe's
        vectors on every worker. ``recipe``: a YAML path or a dict. Invalid recipes
        (unsupported method, checkpoints that do not match the base) raise a
        ValueError (``mergekit_rlvr.errors.UserError``) before the engine starts.
        ``offload``: keep the swap's base and vectors in pinned host memory and stream
        them to the device at each swap (for vectors that do not fit beside the weights;
        nothing is reserved on the device for them). ``groups``: one coefficient per module group (see :mod:`mergekit_rlvr.groups`;
        default: the recipe's ``search.groups``). Models may be local directories or
        Hugging Face ids (``org/name[@revision]``, see :mod:`mergekit_rlvr.hub`): the
        engine starts on the base's snapshot directory. The KV cache is sized in bytes
        on CPU (:mod:`vllm_plugins.memory`: ``sequences`` at once, default the engine's
        ``max_num_seqs``); what cannot fit fails in one line naming the setting,
        prefixed by ``settings_prefix`` (the search passes ``search.engine.``)."""
        from mergekit_rlvr.decompose import decompose

        from vllm_plugins.spec import load_spec

        data = _with_groups(recipe, groups)
        d = decompose(data, trust_remote_code=bool(llm_kwargs.get("trust_remote_code", False)))
        values = None if coefficients is None else d.check_coefficients(coefficients)
        from vllm_plugins.memory import _on_cpu, size_engine, start_errors
        from vllm_plugins.plan import swap_bytes

        # the pre-pass (checks every checkpoint against the base before the engine starts)
        # and what the swap will hold per device, reserved before vLLM sizes its KV cache
        planned = swap_bytes(d, int(llm_kwargs.get("tensor_parallel_size") or 1), progress=True)
        spec = load_spec(data, values, paths=paths, models=d.resolved, offload=offload, prepared=d.prepared_state(),
                         trust_remote_code=bool(llm_kwargs.get("trust_remote_code", False)))
        llm_kwargs.setdefault("model", d.base_path)
        # (offloaded to host memory on a GPU, they take none of the device's)
        reserve = planned["per_rank"] if not offload or _on_cpu() else 0
        llm_kwargs = size_engine(llm_kwargs, llm_kwargs["model"], sequences, settings_prefix, swap_bytes=reserve)
        llm_kwargs["worker_extension_cls"] = WORKER_EXTENSION
        from vllm import LLM

        with start_errors(settings_prefix):
            llm = LLM(**llm_kwargs)
        out = cls(llm, d, spec, values)
        out.planned_bytes = planned
        return out

    def load_recipe(self, recipe, *, paths: str = "auto", coefficients=None, groups: Any = None,
                    offload: Optional[bool] = None) -> List[Dict[str, Any]]:
        """Switch this engine to another recipe on the same base model (its vectors
        replace the current ones; its coefficients, or ``coefficients``, are applied).
        ``offload``: as in :meth:`from_recipe` (default: as the engine was started)."""
        import os

        from mergekit_rlvr.decompose import decompose
        from mergekit_rlvr.errors import UserError

        from vllm_plugins.spec import load_spec

        data = _with_groups(recipe, groups)
        d = decompose(data)
        if os.path.realpath(d.base_path) != os.path.realpath(self._d.base_path):
            raise UserError(f"recipe base_model {d.base_path} is not this engine's base {self._d.base_path}")
        d.prepare()
        values = None if coefficients is None else d.check_coefficients(coefficients)
        offload = bool(self._spec.get("offload", False) if offload is None else offload)
        spec = load_spec(data, values, paths=paths, models=d.resolved, offload=offload,
                         prepared=d.prepared_state())
        reports = self._rpc(rpc.LOAD, spec)
        self._spec = spec
        self.llm.reset_prefix_cache()
        self._d = d
        self._values = list(d.coefficients) if values is None else values
        self.version += 1
        self.load_reports = reports
        return reports

    # -- coefficients --------------------------------------------------------------
    @property
    def method(self) -> str:
        return self._d.method

    @property
    def coefficient_names(self) -> List[str]:
        return list(self._d.coefficient_names)

    @property
    def coefficients(self) -> Dict[str, float]:
        return dict(zip(self._d.coefficient_names, self._values))

    def validate(self, coefficients) -> List[float]:
        """The coefficients as a list in name order; ValueError naming the bad
        name, value or length."""
        return self._d.check_coefficients(coefficients)

    def set_coefficients(self, coefficients) -> Dict[str, Any]:
        """Rewrite the weights for ``coefficients`` (dict by name or list in name
        order). Invalid input raises ValueError and leaves the weights as they were.
        Prefix caches are reset. Returns the first worker's timing report."""
        values = self.validate(coefficients)
        reports = self._rpc(rpc.SET, values)
        self.llm.reset_prefix_cache()
        self._values = values
        self.version += 1
        return reports[0]

    def close(self) -> None:
        """Shut the engine down now (worker processes included)."""
        shutdown(self.llm)

    def __enter__(self) -> "HotSwapLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- passthrough -----------------------------------------------------------------
    def generate(self, *args, **kwargs):
        return self.llm.generate(*args, **kwargs)

    def state(self) -> List[rpc.StateReply]:
        """Per worker (tensor-parallel rank): ``bytes`` (every byte the swap holds
        beyond vLLM's own weights, with ``base_bytes`` and ``vector_bytes``), path per
        parameter, version, coefficients."""
        return self._rpc(rpc.STATE)

    def read_weights(self, names: Optional[List[str]] = None) -> List[Dict[str, Any]]:
        """Per worker: copies of the live parameters that are plain tensors
        (name -> torch.Tensor)."""
        return [{k: rpc.decode_tensor(v) for k, v in r.items()} for r in self._rpc(rpc.READ, names)]

    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)

    def __getattr__(self, name):  # chat, encode, get_tokenizer, ... of vllm.LLM
        if name in ("llm", "_d", "_spec", "planned_bytes"):
            raise AttributeError(name)
        return getattr(self.llm, name)


def _with_groups(recipe, groups) -> Dict[str, Any]:
    """The recipe as a dict, with ``search.groups`` set when ``groups`` is given."""
    from mergekit_rlvr.decompose import load_recipe

    data = load_recipe(recipe)
    if groups is not None:
        data["search"] = {**(data.get("search") or {}), "groups": groups}
    return data


def shutdown(llm) -> None:
    """Stop a ``vllm.LLM``'s engine core (and its worker processes) now, rather than
    at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
