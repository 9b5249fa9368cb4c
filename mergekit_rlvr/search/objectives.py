"""The DoTS objectives measured on the engine's current weights: answer consistency
(paper 000, Eq. 4, averaged over queries) and perplexity from the same engine
(vLLM prompt logprobs on the question, as the authors' code measures it on its
second copy of the model, or the sampled tokens' own logprobs)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from mergekit_rlvr.search.answers import equivalent, extract_answer, majority_vote
from mergekit_rlvr.search.queries import Query
from mergekit_rlvr.search.settings import SearchSettings


def build_prompt(tokenizer, question: str, settings: SearchSettings, instruction: Optional[str] = None) -> str:
    """The text sent to the engine for one question."""
    text = question + (settings.instruction if instruction is None else instruction)
    if settings.template == "chat":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text
    return settings.template.replace("{prompt}", text)


def sampling_params(settings: SearchSettings, seed: int, **overrides):
    from vllm import SamplingParams

    values = dict(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                  max_tokens=settings.max_tokens, seed=seed if settings.sample_seeds else None)
    values.update(overrides)
    return SamplingParams(**values)


@dataclass
class Measurement:
    """One trial's measurement. ``values``: objective name -> value."""

    values: Dict[str, float]
    per_query: List[float] = field(default_factory=list)
    generate_s: float = 0.0  # inside engine.generate
    score_s: float = 0.0  # answer extraction, voting, perplexity arithmetic
    stopped_early: bool = False
    accuracy: Optional[float] = None  # majority answer vs the queries' `answer` (reported, never optimized)


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


#: called after each chunk with (sum of consistencies so far, queries done, total queries);
#: returns True to stop the trial (it cannot reach the Pareto front any more)
StopRule = Callable[[float, int, int], bool]


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


def render_messages(tokenizer, query: Query) -> str:
    """``prompt_format: messages``: the row's chat messages as given (system turn
    included, no instruction added), through the tokenizer's chat template."""
    from mergekit_rlvr.errors import UserError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError("search.prompt_format: messages needs a tokenizer with a chat template")
    messages = query.messages or [{"role": "user", "content": query.prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def query_prompts(tokenizer, queries: Sequence[Query], settings: SearchSettings, instruction: Optional[str] = None):
    """The generation prompt of every query: ``build_prompt`` on its question (the
    user turn plus the instruction), or with ``prompt_format: messages`` its chat
    messages as given. Perplexity prompts (``instruction=""``) are always the question."""
    if settings.prompt_format == "messages" and instruction is None:
        return [render_messages(tokenizer, q) for q in queries]
    return [build_prompt(tokenizer, q.prompt, settings, instruction) for q in queries]


def dots_prompts(tokenizer, queries: Sequence[Query], settings: SearchSettings):
    """(generation prompts with the instruction, perplexity prompts without it), as the authors' code."""
    return query_prompts(tokenizer, queries, settings), query_prompts(tokenizer, queries, settings, instruction="")
