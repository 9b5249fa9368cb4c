"""Accuracy of a model on the toy family's held-out sets, greedy decoding.

``evaluate`` takes a checkpoint directory (a fresh ``vllm.LLM`` is started on it
and shut down afterwards), or anything with vLLM's ``generate(prompts,
sampling_params)`` method (a ``vllm.LLM`` or a ``HotSwapLLM`` at its current
coefficients). ``backend="hf"`` decodes a directory with Hugging Face instead:
same greedy answers on these tiny models, no engine start-up."""

from __future__ import annotations

import gc
from typing import Dict, List, Sequence, Union

from mergekit_rlvr.toy.tasks import Example, score

MAX_TOKENS = 40
MAX_MODEL_LEN = 128  # the toy models' context
MAX_NUM_SEQS = 256


def vllm_kwargs(model: str, **overrides) -> dict:
    """vLLM CPU settings that suit the toy models. The KV cache is sized in bytes for
    what these engines run (every sequence at full context at once: 256 x 128 tokens
    x 1 KiB per token for the toy family = 32 MiB), never as a fraction of RAM."""
    from vllm_plugins.memory import kv_cache_bytes

    values = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
                  max_num_seqs=MAX_NUM_SEQS)
    values.update(overrides)
    values.setdefault("kv_cache_memory_bytes", kv_cache_bytes(
        model, values["max_num_seqs"] * values["max_model_len"], values["dtype"]))
    return values


def generate_vllm(llm, prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> List[str]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.generate(list(prompts), params, use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def generate_hf(path: str, prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> List[str]:
    from mergekit_rlvr.toy.lm import Codec, greedy_texts, load_model

    return greedy_texts(load_model(path), Codec(), prompts, max_new=max_tokens)


def _texts(model, prompts: List[str], backend: str, max_tokens: int) -> List[str]:
    if not isinstance(model, str):
        return generate_vllm(model, prompts, max_tokens)
    if backend == "hf":
        return generate_hf(model, prompts, max_tokens)
    if backend != "vllm":
        raise ValueError(f"backend must be 'vllm' or 'hf', got {backend!r}")
    from vllm import LLM

    from vllm_plugins.memory import start_errors

    with start_errors():
        llm = LLM(model=model, **vllm_kwargs(model))
    try:
        return generate_vllm(llm, prompts, max_tokens)
    finally:
        del llm
        gc.collect()


def evaluate(model: Union[str, object], sets: Dict[str, Sequence[Example]], backend: str = "vllm",
             max_tokens: int = MAX_TOKENS) -> Dict[str, float]:
    """{task: accuracy for each set, "union": accuracy on all items together}.

    ``model``: checkpoint directory, or an object with vLLM's ``generate``."""
    names = list(sets)
    prompts = [e.prompt for t in names for e in sets[t]]
    texts = _texts(model, prompts, backend, max_tokens)
    result, start, hits = {}, 0, 0
    for t in names:
        n = len(sets[t])
        ok = score(texts[start:start + n], sets[t])
        result[t] = sum(ok) / n if n else 0.0
        hits += sum(ok)
        start += n
    result["union"] = hits / len(prompts) if prompts else 0.0
    return result
