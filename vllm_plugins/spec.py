"""The ``hotswap_load`` spec a driver sends to every worker (no vLLM, no torch).

Used by :class:`vllm_plugins.hotswap.HotSwapLLM` and by the serving endpoint.
"""

from __future__ import annotations

import base64
import zlib
from typing import Mapping, Optional, Sequence

from vllm_plugins.rpc import PATHS, LoadRequest


def load_spec(
    recipe,
    coefficients: Optional[Sequence[float]] = None,
    paths: str = "auto",
    trust_remote_code: bool = False,
    models: Optional[Mapping[str, str]] = None,
    offload: bool = False,
    prepared: Optional[bytes] = None,
) -> LoadRequest:
    """``recipe``: a path or a dict; model strings become local directories (absolute
    paths, hub ids' snapshots in the Hugging Face cache) so that worker processes read
    the same files whatever their working directory, without the Hub.
    ``models``: resolutions already made (as written -> directory; ``Decomposition.resolved``),
    so that the workers read the snapshot the engine was started on.
    ``paths="reload"`` sends every parameter through vLLM's reload (for checks)."""
    from mergekit_rlvr.decompose import load_recipe
    from mergekit_rlvr.hub import resolve_recipe
    from mergekit_rlvr.errors import UserError

    if paths not in PATHS:
        raise UserError(f"paths must be one of {', '.join(PATHS)}, got {paths!r}")
    local, aliases = resolve_recipe(load_recipe(recipe), models)
    return {
        "recipe": local,
        # coefficient names keep the model strings as written (relative paths, hub ids)
        "aliases": aliases,
        "coefficients": None if coefficients is None else [float(c) for c in coefficients],
        "paths": paths,
        "trust_remote_code": bool(trust_remote_code),
        "offload": bool(offload),
        # the driver's pre-pass (Decomposition.prepared_state): workers do not read every checkpoint again
        "prepared": prepared,
    }


#: an environment string stays well under Linux's 128 KiB per string
MAX_ENCODED = 100_000


def encode_prepared(state: Optional[bytes]) -> Optional[str]:
    """``Decomposition.prepared_state()`` as an environment string (None: nothing to
    pass, or too large: the workers then run the pre-pass themselves)."""
    if state is None:
        return None
    encoded = base64.b64encode(zlib.compress(state, 6)).decode("ascii")
    return encoded if len(encoded) <= MAX_ENCODED else None


def decode_prepared(encoded: Optional[str]) -> Optional[bytes]:
    return None if not encoded else zlib.decompress(base64.b64decode(encoded))
