"""The hot swap's RPC contract, shared by :class:`vllm_plugins.hotswap.HotSwapLLM`,
the serving endpoint and the worker extension (:mod:`vllm_plugins.worker`): the
method names, the request and reply types, the one coefficient validator, and the
tensor encoding that survives vLLM's RPC serialization. No vLLM import.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Dict, List, Optional, Sequence, TypedDict

#: the worker extension's RPC methods (``LLM.collective_rpc(name, args=...)``)
LOAD = "hotswap_load"
SET = "hotswap_set"
STATE = "hotswap_state"
READ = "hotswap_read"
PATHS = ("auto", "reload")


class LoadRequest(TypedDict):
    """``hotswap_load``'s one argument (built by :func:`vllm_plugins.spec.load_spec`)."""

    recipe: Dict[str, Any]  # model strings replaced by absolute local directories
    aliases: Dict[str, str]  # local directory -> model string as written (coefficient names)
    coefficients: Optional[List[float]]  # None: the recipe's own
    paths: str  # "auto" | "reload"
    trust_remote_code: bool
    offload: bool  # keep base and vectors in pinned host memory, streamed to the device per swap
    prepared: Optional[bytes]  # Decomposition.prepared_state() of the driver (None: each worker prepares)


class SetReply(TypedDict):
    """``hotswap_set``'s reply (per worker)."""

    seconds: float
    reload_seconds: float  # vLLM's reload (loaders, repacking), the combine included
    reload_combine_seconds: float  # of which computing base + sum c_j v_j
    inplace_seconds: float
    version: int


class StateReply(TypedDict, total=False):
    """``hotswap_state``'s reply (per worker; ``loaded`` False before any load)."""

    loaded: bool
    method: str
    names: List[str]
    coefficients: List[float]
    version: int
    bytes: int  # every byte the swap holds on this rank beyond vLLM's own weights
    base_bytes: int  # of which the base where some vector is non-zero (and its bitmask)
    vector_bytes: int  # of which the vectors (bitmasks, values)
    vector_dense_bytes: int  # what the vectors would take as dense float32 tensors
    weight_bytes: int  # the merged tensors' bytes on this rank, in the dtype mergekit writes
    inplace: List[str]  # vLLM parameters rewritten in place
    reload: List[str]  # checkpoint tensors sent through vLLM's reload_weights
    paths: Dict[str, str]  # vLLM parameter -> "inplace" | "reload"
    layout_error: Optional[str]
    layout_stray_copies: int
    reload_rank_restricted: int
    load_seconds: float
    rank: int
    offload: bool
    # what loading read of the checkpoints (vllm_plugins.parts.Parts.reads): bytes, whole
    # (the same reads of whole tensors), boxed (tensors read in part), tensors, prepass
    reads: Dict[str, Any]
    set: SetReply  # hotswap_load's reply only: the first swap


#: float32's largest finite value: the swap computes c_j * v_j in float32
FLOAT32_MAX = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]


def check_values(method: Optional[str], names: Sequence[str], values: Sequence[Any]) -> List[float]:
    """The one coefficient validator: a list of floats, one per name, each finite and
    within float32's range (the swap's arithmetic; 1e39 would make the weights inf),
    and within the method's range (reasoning_interp's alpha in [0, 1]). ValueError
    (``mergekit_rlvr.errors.UserError``) naming the coefficient otherwise."""
    from mergekit_rlvr.errors import UserError

    values = list(values)
    if len(values) != len(names):
        raise UserError(f"expected {len(names)} coefficients ({', '.join(names)}), got {len(values)}")
    out = []
    for name, value in zip(names, values):
        if isinstance(value, bool):
            raise UserError(f"coefficient {name!r} is not a number: {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"coefficient {name!r} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"coefficient {name!r} is {number} (must be finite)")
        if abs(number) > FLOAT32_MAX:
            raise UserError(f"coefficient {name!r} is {number:g}: beyond float32's range (|c| <= {FLOAT32_MAX:.4g}), "
                            f"in which the swap computes c * v")
        if method is not None:  # the method's own range (mergekit_rlvr.kernels.coefficients)
            from mergekit_rlvr.kernels.coefficients import coefficient

            try:
                number = coefficient(method).check(number, name)
            except ValueError as error:
                raise UserError(str(error)) from None
        out.append(number)
    return out


def encode_tensor(t) -> Dict[str, Any]:
    """A tensor as plain data that survives vLLM's RPC serialization."""
    import torch

    t = t.cpu().contiguous()
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "data": t.view(-1).view(torch.uint8).numpy().tobytes()}


def decode_tensor(d: Dict[str, Any]):
    import torch

    dtype = getattr(torch, d["dtype"])
    raw = torch.frombuffer(bytearray(d["data"]), dtype=torch.uint8)
    return raw.view(dtype).reshape(d["shape"]).clone()
