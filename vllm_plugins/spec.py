"""The ``hotswap_load`` spec a driver sends to every worker (no vLLM, no torch).

Used by :class:`vllm_plugins.hotswap.HotSwapLLM` and by the serving endpoint.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

PATHS = ("auto", "reload")


def load_spec(
    recipe,
    coefficients: Optional[Sequence[float]] = None,
    paths: str = "auto",
    trust_remote_code: bool = False,
) -> Dict[str, Any]:
    """``recipe``: a path or a dict; model paths are made absolute so that worker
    processes read the same files whatever their working directory.
    ``paths="reload"`` sends every parameter through vLLM's reload (for checks)."""
    from mergekit_rlvr.decompose import absolute_recipe, model_aliases
    from mergekit_rlvr.errors import UserError

    if paths not in PATHS:
        raise UserError(f"paths must be one of {', '.join(PATHS)}, got {paths!r}")
    return {
        "recipe": absolute_recipe(recipe),
        # coefficient names keep the model strings as written (relative paths too)
        "aliases": model_aliases(recipe),
        "coefficients": None if coefficients is None else [float(c) for c in coefficients],
        "paths": paths,
        "trust_remote_code": bool(trust_remote_code),
    }
