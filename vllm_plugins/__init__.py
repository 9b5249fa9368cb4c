"""vLLM plugins of mergekit-rlvr: hot-swap merge coefficients in a running engine.

- ``register`` is the ``vllm.general_plugins`` entry point; vLLM calls it in every
  process, so it imports nothing heavy.
- ``HotSwapLLM`` (imported lazily): ``vllm.LLM`` on a recipe's base model whose
  weights are rewritten in place when coefficients change.
- ``vllm_plugins.worker.HotSwapWorkerExtension``: the worker side (RPCs).
"""

from __future__ import annotations

from vllm_plugins.names import WORKER_EXTENSION

__all__ = ["HotSwapLLM", "WORKER_EXTENSION", "register"]


def register() -> None:
    """Nothing to register eagerly: the worker extension is named by
    ``worker_extension_cls`` and imported by vLLM in each worker."""
    return None


def __getattr__(name):
    if name == "HotSwapLLM":
        from vllm_plugins.hotswap import HotSwapLLM

        return HotSwapLLM
    raise AttributeError(f"module 'vllm_plugins' has no attribute {name!r}")
