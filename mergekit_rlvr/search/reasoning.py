"""Reasoning rate (paper 003, Eq. 4) and the search for the largest merge ratio
whose rate stays at least rho_min (Eq. 5, Alg. 1: grid, or binary search that stops
early at a rate in [rho_min, 1)).

A response reasons when its trace between ``think_start`` and ``think_end`` is
non-empty. The prompt ends with ``think_start`` (appended unless the template
already ends with it). Detection:

- ``prefix``: sample a few tokens after the start marker; the trace is empty when
  they open with the end marker (or the response ends at once).
- ``full``: sample whole responses and look at the trace.
- ``logit``: the probability p of the end marker's tokens right after the start
  marker (vLLM prompt logprobs); the query's reasoning rate is 1 - p.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Sequence, Tuple

from mergekit_rlvr.search.measurement import Measurement
from mergekit_rlvr.search.prompts import build_prompt, render_messages, sampling_params
from mergekit_rlvr.search.queries import Query
from mergekit_rlvr.search.settings import SearchSettings


def reasoning_prompts(tokenizer, queries: Sequence[Query], settings: SearchSettings) -> List[str]:
    """The question (no instruction), or with ``prompt_format: messages`` the row's chat
    messages as given, through the template, then ``think_start``."""
    prompts = []
    for query in queries:
        if settings.prompt_format == "messages":
            text = render_messages(tokenizer, query)
        else:
            text = build_prompt(tokenizer, query.prompt, settings, instruction="")
        if not text.rstrip().endswith(settings.think_start.strip()):
            text += settings.think_start
        prompts.append(text)
    return prompts


def trace_is_empty(text: str, think_end: str, finished: bool) -> bool:
    """Whether a continuation of ``...think_start`` leaves the reasoning trace empty.
    ``finished``: the response ended by itself (EOS or stop), not by the token budget."""
    stripped = text.lstrip()
    if stripped.startswith(think_end.strip()):
        return True
    if not stripped:
        return finished  # ended before writing anything (a cut-off budget says nothing)
    if not finished and think_end.strip().startswith(stripped):
        return True  # the budget ran out inside the end marker
    if finished and think_end not in text:
        return False
    trace = text.split(think_end, 1)[0]
    return not trace.strip()


def _finished(completion) -> bool:
    return getattr(completion, "finish_reason", None) not in ("length",)


def measure_sampled(engine, prompts: Sequence[str], settings: SearchSettings, full: bool) -> Measurement:
    """Reasoning rate from sampled continuations (``prefix`` or ``full`` detection)."""
    max_tokens = settings.max_tokens if full else settings.prefix_tokens
    params = [sampling_params(settings, settings.seed + i, max_tokens=max_tokens) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = engine.generate(list(prompts), params, use_tqdm=False)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    per_query = []
    for output in outputs:
        flags = [not trace_is_empty(c.text, settings.think_end, _finished(c)) for c in output.outputs]
        per_query.append(sum(flags) / len(flags))
    score_s = time.perf_counter() - start
    return Measurement({"reasoning_rate": sum(per_query) / len(per_query)}, per_query, generate_s, score_s)


def measure_logit(engine, prompts: Sequence[str], settings: SearchSettings) -> Measurement:
    """Reasoning rate as the mean of 1 - P(end marker right after the start marker)."""
    from vllm import SamplingParams

    tokenizer = engine.get_tokenizer()
    end_ids = tokenizer.encode(settings.think_end, add_special_tokens=False)
    requests = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        requests.append({"prompt_token_ids": list(ids) + list(end_ids)})
    start = time.perf_counter()
    outputs = engine.generate(requests, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    per_query = []
    for output in outputs:
        ids = output.prompt_token_ids
        logprob = 0.0
        for position in range(len(ids) - len(end_ids), len(ids)):
            logprob += output.prompt_logprobs[position][ids[position]].logprob
        per_query.append(1.0 - math.exp(logprob))
    score_s = time.perf_counter() - start
    return Measurement({"reasoning_rate": sum(per_query) / len(per_query)}, per_query, generate_s, score_s)


def measure_reasoning(engine, prompts: Sequence[str], settings: SearchSettings) -> Measurement:
    if settings.detect == "logit":
        return measure_logit(engine, prompts, settings)
    return measure_sampled(engine, prompts, settings, full=settings.detect == "full")


# --------------------------------------------------------------------------- strategies
def grid_points(bounds: Tuple[float, float], k: int) -> List[float]:
    """A_K = {lo + j/K (hi - lo): j = 0..K} (paper: lo 0, hi 1)."""
    lo, hi = bounds
    return [lo + (hi - lo) * j / k for j in range(k + 1)]


def grid_search(evaluate: Callable[[float], float], bounds: Tuple[float, float], k: int) -> Dict[float, float]:
    """Alg. 1 as written: evaluate every grid point, largest first; returns alpha -> rate."""
    return {alpha: evaluate(alpha) for alpha in reversed(grid_points(bounds, k))}


def binary_search(
    evaluate: Callable[[float], float],
    bounds: Tuple[float, float],
    rho_min: float,
    max_steps: int = 8,
    full_rate: float = 1.0,
) -> Dict[float, float]:
    """The paper's binary search (Sec. 3, Optimizations): reasoning falls monotonically
    with alpha and the lower bound (the reasoning model) is taken to reason. The upper
    bound is tried first; then bisection keeps (good, bad) with rate(good) >= rho_min
    > rate(bad), stopping after ``max_steps`` evaluations in all or at once on a rate in
    [rho_min, 1) (``full_rate`` stands for 1: an expected rate from logits is never
    exactly 1, so the search passes 0.999 for ``detect: logit``). Returns alpha -> rate of the evaluated points; the answer is the
    largest evaluated alpha with rate >= rho_min (the lower bound if none)."""
    lo, hi = bounds
    rates: Dict[float, float] = {}
    rates[hi] = evaluate(hi)
    if rates[hi] >= rho_min:
        return rates
    good, bad = lo, hi
    while len(rates) < max_steps:
        mid = (good + bad) / 2.0
        rate = rates[mid] = evaluate(mid)
        if rho_min <= rate < full_rate:
            break
        if rate >= rho_min:
            good = mid
        else:
            bad = mid
    return rates
