"""What the search needs from an engine: the small protocol that
``vllm_plugins.hotswap.HotSwapLLM`` satisfies, and opening one from a recipe.

The search logic only talks to this protocol, so it runs against any object with
these members (tests use a scripted stand-in for the pure logic, and the real
HotSwapLLM on vLLM CPU end to end)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Protocol, Sequence, Union, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    @property
    def coefficients(self) -> Dict[str, float]:  # name -> value, recipe order
        ...

    def set_coefficients(self, coefficients: Union[Mapping[str, float], Sequence[float]]) -> Any:
        ...

    def generate(self, prompts, sampling_params, **kwargs) -> List[Any]:  # vllm.LLM.generate
        ...

    def get_tokenizer(self) -> Any:
        ...


def open_engine(recipe: Union[str, Mapping[str, Any]], engine_kwargs: Mapping[str, Any]):
    """One HotSwapLLM on the recipe's base model; returns (engine, start seconds).
    Its KV cache is sized in bytes on CPU (``vllm_plugins.memory``); settings that
    cannot fit fail in one line naming ``search.engine.<setting>``."""
    from vllm_plugins.hotswap import HotSwapLLM

    start = time.perf_counter()
    engine = HotSwapLLM.from_recipe(recipe, settings_prefix="search.engine.", **dict(engine_kwargs))
    return engine, time.perf_counter() - start


def close_engine(engine) -> None:
    """Stop the engine's worker processes now rather than at interpreter exit
    (``HotSwapLLM.close``; engines without ``close`` are left alone)."""
    close = getattr(engine, "close", None)
    try:
        if close is not None:
            close()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
