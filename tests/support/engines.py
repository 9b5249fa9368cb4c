"""One real vLLM CPU engine (HotSwapLLM) for a test module, sized in bytes."""

from __future__ import annotations

from typing import Any, Dict, Iterator

#: the tiny family's engine: float32, 64 MiB of KV cache (never a RAM fraction on CPU)
TINY_ENGINE: Dict[str, Any] = {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_bytes": 2**26, "seed": 0}


def hotswap_engine(recipe, **engine_kwargs) -> Iterator[Any]:
    """Yields a HotSwapLLM on ``recipe`` (a path or a mapping) and closes it after (a
    generator for a module fixture: ``yield from hotswap_engine(path, **ENGINE)``)."""
    from vllm_plugins.hotswap import HotSwapLLM

    from mergekit_rlvr.search.engine import close_engine

    llm = HotSwapLLM.from_recipe(str(recipe) if not isinstance(recipe, dict) else recipe, **engine_kwargs)
    try:
        yield llm
    finally:
        close_engine(llm)


def opener(engine, calls=None):
    """``open_engine`` for run_search / run_select_queries: the module's engine, the
    kwargs it was asked for recorded in ``calls``."""
    def open_engine(recipe, kwargs):
        if calls is not None:
            calls.append(dict(kwargs))
        return engine
    return open_engine
