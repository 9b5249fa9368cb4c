"""The DoTS objectives measured on the engine's current weights: answer consistency
(paper 000, Eq. 4, averaged over queries) and perplexity from the same engine
(vLLM prompt logprobs on the question, as the authors' code measures it on its
second copy of the model, or the sampled tokens' own logprobs)."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_rlvr.search.answers import equivalent, extract_answer, majority_vote
from mergekit_rlvr.search.measurement import Measurement, StopRule
from mergekit_rlvr.search.prompts import query_prompts, sampling_params
from mergekit_rlvr.search.queries import Query
from mergekit_rlvr.search.settings import SearchSettings


def dots_prompts(tokenizer, queries: Sequence[Query], settings: SearchSettings):
    """(generation prompts with the instruction, perplexity prompts without it), as the authors' code."""
    return query_prompts(tokenizer, queries, settings), query_prompts(tokenizer, queries, settings, instruction="")


def mean_nll_of_prompt(output) -> Optional[float]:
    """Mean negative log-likelihood of a prompt's tokens after the first (vLLM prompt_logprobs)."""
    logprobs = output.prompt_logprobs or []
    ids = output.prompt_token_ids
    values = []
    for position in range(1, len(ids)):
        entry = logprobs[position] if position < len(logprobs) else None
        if entry and ids[position] in entry:
            values.append(-entry[ids[position]].logprob)
    return sum(values) / len(values) if values else None


def perplexity_of_prompts(engine, prompts: Sequence[str]) -> (float, float):
    """exp(mean over prompts of the mean token NLL) as the authors' calculate_perplexity;
    returns (perplexity, seconds inside generate)."""
    from vllm import SamplingParams

    start = time.perf_counter()
    outputs = engine.generate(list(prompts), SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
                              use_tqdm=False)
    elapsed = time.perf_counter() - start
    nlls = [v for v in (mean_nll_of_prompt(o) for o in outputs) if v is not None]
    return (math.exp(sum(nlls) / len(nlls)) if nlls else float("inf")), elapsed


def response_mean_nll(completion) -> Optional[float]:
    count = len(completion.token_ids)
    if not count or completion.cumulative_logprob is None:
        return None
    return -completion.cumulative_logprob / count


def measure_dots(
    engine,
    prompts: Sequence[str],
    ppl_prompts: Sequence[str],
    settings: SearchSettings,
    stop_rule_for: Optional[Callable[[float], StopRule]] = None,
    references: Optional[Sequence[Optional[str]]] = None,
) -> Measurement:
    """Consistency and perplexity of the engine's current weights on the queries.

    With ``sample_seeds``, query i is sampled with seed ``settings.seed + i`` in every
    trial (common random numbers across trials). Perplexity "prompt" is measured first; with
    ``stop_rule_for`` (perplexity -> rule) the queries then run in ``settings.chunks``
    chunks and the trial may stop after any of them."""
    generate_s = score_s = 0.0
    values: Dict[str, float] = {}
    if settings.perplexity == "prompt":
        values["perplexity"], seconds = perplexity_of_prompts(engine, ppl_prompts)
        generate_s += seconds
    should_stop = stop_rule_for(values["perplexity"]) if stop_rule_for and "perplexity" in values else None

    total = len(prompts)
    chunks = settings.chunks if should_stop is not None else 1
    bounds = [round(total * k / chunks) for k in range(chunks + 1)]
    per_query: List[float] = []
    correct: List[bool] = []
    nlls: List[float] = []
    want_logprobs = settings.perplexity == "response"
    for lo, hi in zip(bounds, bounds[1:]):
        if lo == hi:
            continue
        params = [sampling_params(settings, settings.seed + i, logprobs=0 if want_logprobs else None)
                  for i in range(lo, hi)]
        start = time.perf_counter()
        outputs = engine.generate(list(prompts[lo:hi]), params, use_tqdm=False)
        generate_s += time.perf_counter() - start
        start = time.perf_counter()
        for index, output in zip(range(lo, hi), outputs):
            texts = [c.text for c in output.outputs]
            vote = majority_vote([extract_answer(t) for t in texts], settings.consistency)
            per_query.append(vote.consistency)
            if references is not None and references[index] is not None:
                correct.append(vote.answer is not None and equivalent(vote.answer, references[index]))
            if want_logprobs:
                nlls.extend(v for v in (response_mean_nll(c) for c in output.outputs) if v is not None)
        score_s += time.perf_counter() - start
        if should_stop is not None and hi < total and should_stop(sum(per_query), hi, total):
            return Measurement({**values, "consistency": sum(per_query) / hi}, per_query, generate_s, score_s, True)
    values["consistency"] = sum(per_query) / total
    if want_logprobs:
        values["perplexity"] = math.exp(sum(nlls) / len(nlls)) if nlls else float("inf")
    return Measurement({"consistency": values["consistency"], "perplexity": values["perplexity"]},
                       per_query, generate_s, score_s, accuracy=sum(correct) / len(correct) if correct else None)


def query_consistencies(engine, prompts: Sequence[str], settings: SearchSettings) -> (List[float], float):
    """C(x) of Eq. 4 for every prompt on the current weights (select-queries);
    returns (consistencies, seconds inside generate)."""
    params = [sampling_params(settings, settings.seed + i) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = engine.generate(list(prompts), params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return [majority_vote([extract_answer(c.text) for c in o.outputs], settings.consistency).consistency
            for o in outputs], seconds
