"""The one module that reaches into vLLM's internals (tested: vLLM 0.32 CPU, whose
layerwise reload 0.33 shares). Each function says what it mirrors; on a vLLM where
it moved, the error is one line naming the versions."""

from __future__ import annotations

from typing import Any, Callable, Optional

TESTED = ("0.32",)


def version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001 - only for the message
        return "unknown"


def _moved(what: str, error: Exception) -> RuntimeError:
    return RuntimeError(f"vLLM {version()}: {what} is not where vLLM {', '.join(TESTED)} has it ({error}); "
                        f"mergekit-rlvr's hot swap is tested with vLLM {', '.join(TESTED)}")


def layerwise_reload():
    """(LAYERWISE_INFO, _get_original_loader) of vLLM's layerwise reload
    (``model_executor/model_loader/reload/layerwise.py``): the per-module record of
    what the loaders received, and a parameter's loader before reload wrapped it."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _get_original_loader
    except ImportError as error:
        raise _moved("model_loader.reload.layerwise (LAYERWISE_INFO, _get_original_loader)", error) from None
    return LAYERWISE_INFO, _get_original_loader


def call_every_engine(engine_client) -> Optional[Callable[..., Any]]:
    """The engine core client's ``call_utility_all_async`` (one result per
    data-parallel engine), or None where this vLLM has none."""
    return getattr(getattr(engine_client, "engine_core", None), "call_utility_all_async", None)
