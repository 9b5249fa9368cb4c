"""A scripted stand-in for the engine protocol (mergekit_rlvr.search.engine.Engine),
for the search's pure logic: resume, kill -9, cooperating processes, reports. It
answers from a known function of the coefficients, so the right trial is known.
The real vLLM engine is exercised in test_search_vllm.py. Run as a script, it is one
search process (the kill -9 and cooperation tests of test_search_study.py)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float]
    finish_reason: str = "stop"


@dataclass
class _Output:
    prompt: str
    prompt_token_ids: List[int]
    outputs: List[_Completion]
    prompt_logprobs: Optional[list] = None


class _Tokenizer:
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) % 256 for ch in text]

    def __call__(self, text):
        class _Enc:
            input_ids = self.encode(text)
        return _Enc()


FORMS = ["1/2", "\\frac{1}{2}", "0.5"]  # one answer, three spellings


class FakeEngine:
    """Consistency peaks at (a, b) = (1.5, 0.5): k(c) of n samples answer 1/2 (in
    varying spellings), the rest distinct numbers. Perplexity = 10 + (a - 1)^2, so the
    Pareto front trades them. Reasoning: alpha's rate is 1 below 0.6, then falls.
    ``log`` (a path) records every set_coefficients call, one JSON line each."""

    def __init__(self, names=("a", "b"), log: Optional[str] = None, delay: float = 0.0):
        self._names = list(names)
        self._values = [1.0] * len(self._names)
        self.log = log
        self.delay = delay
        self.swaps = 0

    @property
    def coefficients(self) -> Dict[str, float]:
        return dict(zip(self._names, self._values))

    def set_coefficients(self, coefficients):
        if isinstance(coefficients, dict):
            unknown = set(coefficients) - set(self._names)
            if unknown:
                raise ValueError(f"unknown coefficient {sorted(unknown)[0]!r}")
            self._values = [float(coefficients[n]) for n in self._names]
        else:
            self._values = [float(v) for v in coefficients]
        self.swaps += 1
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps(self.coefficients) + "\n")

    def get_tokenizer(self):
        return _Tokenizer()

    # -- the model ------------------------------------------------------------
    def consistency(self) -> float:
        c = self.coefficients
        if "alpha" in c:
            return 1.0
        a, b = c.get("a", 1.0), c.get("b", 1.0)
        return max(0.0, 1.0 - 0.35 * math.hypot(a - 1.5, b - 0.5))

    def perplexity(self) -> float:
        return 10.0 + (self.coefficients.get("a", 1.0) - 1.0) ** 2

    def reasoning_rate(self) -> float:
        alpha = self.coefficients.get("alpha", 0.0)
        return 1.0 if alpha <= 0.6 else max(0.0, 1.0 - (alpha - 0.6) * 2.5)

    def generate(self, prompts, params, use_tqdm=False):
        if self.delay:
            time.sleep(self.delay)
        if not isinstance(params, list):
            params = [params] * len(prompts)
        outputs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else _Tokenizer().encode(prompt)
            if p.prompt_logprobs is not None:
                nll = math.log(self.perplexity())
                lps = [None] + [{t: _Logprob(-nll)} for t in ids[1:]]
                if isinstance(prompt, dict):  # logit detection: P(end marker) spread over its tokens
                    p_close = 1.0 - self.reasoning_rate()
                    share = math.log(p_close) / 8 if p_close > 0 else -math.inf
                    lps[-8:] = [{t: _Logprob(share)} for t in ids[-8:]]
                outputs.append(_Output(str(prompt), ids, [_Completion("", [0], 0.0)], lps))
                continue
            n = p.n
            if "alpha" in self.coefficients:  # reasoning: first k samples reason
                k = round(self.reasoning_rate() * n)
                texts = ["Let me think" if j < k else "</think>The answer" for j in range(n)]
            else:
                k = max(1, round(self.consistency() * n))
                texts = [f"so \\boxed{{{FORMS[j % 3]}}}" if j < k else f"maybe {100 + i * n + j}" for j in range(n)]
            lp = -math.log(self.perplexity())
            outputs.append(_Output(str(prompt), ids, [_Completion(t, [1] * 4, 4 * lp, "stop") for t in texts]))
        return outputs


def fake_opener(log=None, delay=0.0, names=("a", "b")):
    def open_engine(recipe, kwargs):
        return FakeEngine(names, log=log, delay=delay)
    return open_engine


def write_fake_recipe(path, objective="dots", extra=None):
    import yaml

    if objective == "dots":
        recipe = {"merge_method": "dots", "base_model": "base",
                  "models": [{"model": "a", "parameters": {"weight": 1.0}},
                             {"model": "b", "parameters": {"weight": 1.0}}],
                  "search": {"samples": 6, "max_tokens": 8}}
    else:
        recipe = {"merge_method": "reasoning_interp", "base_model": "reasoner",
                  "models": [{"model": "sft"}], "parameters": {"alpha": 0.5},
                  "search": {"samples": 4}}
    recipe["search"].update(extra or {})
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    return str(path)


def write_queries(path, n=4):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"question {i}?", "answer": "1/2"}) + "\n")
    return str(path)


if __name__ == "__main__":  # a search process for the kill -9 / cooperation tests
    import sys

    from mergekit_rlvr.search.runner import run_search

    recipe, queries, out, trials, log, delay = sys.argv[1:7]
    storage = sys.argv[7] if len(sys.argv) > 7 else None
    overrides = {"trials": int(trials)}
    if storage:
        overrides["storage"] = storage
    run_search(recipe, queries, out, overrides, open_engine=fake_opener(log, float(delay)), progress=False)
    print("done", os.getpid())
