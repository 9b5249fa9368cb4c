"""lm-evaluation-harness on a hot-swapped merge: an lm-eval model class over
:class:`vllm_plugins.hotswap.HotSwapLLM`, and ``run_eval`` that scores several
coefficient settings of one recipe on one engine (no merged checkpoint written, no
engine restarted between settings).

``HotSwapLM`` implements lm-eval's three request types on the engine's current
weights: ``loglikelihood`` (vLLM prompt logprobs of context + continuation; greedy
when every continuation token is the top-ranked one), ``loglikelihood_rolling``
(lm-eval's own rolling windows) and ``generate_until`` (one batched
``generate``; greedy unless the task asks for sampling).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from mergekit_rlvr.errors import UserError

try:  # lm-eval is the optional [eval] extra
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - a clear error when used
    TemplateLM = object


class HotSwapLM(TemplateLM):
    """An lm-eval ``LM`` on a HotSwapLLM (or any ``vllm.LLM``-like engine)."""

    def __init__(self, engine, max_gen_toks: int = 256, max_length: Optional[int] = None):
        if TemplateLM is object:
            raise UserError("lm-eval is not installed: pip install 'mergekit-rlvr[eval]'")
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self.max_gen_toks = max_gen_toks
        config = engine.llm_engine.model_config if hasattr(engine, "llm_engine") else None
        self.max_length = max_length or (config.max_model_len if config is not None else 2048)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _score(self, sequences: List[List[int]], starts: List[int]) -> List[tuple]:
        """(sum of logprobs of tokens[start:], all of them top-ranked) per sequence."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outputs = self.engine.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params,
                                       use_tqdm=False)
        results = []
        for tokens, start, out in zip(sequences, starts, outputs):
            total, greedy = 0.0, True
            for position in range(max(start, 1), len(tokens)):
                entry = out.prompt_logprobs[position][tokens[position]]
                total += entry.logprob
                greedy = greedy and entry.rank == 1
            results.append((total, greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[tuple]:
        sequences, starts = [], []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-self.max_length:]
            sequences.append(tokens)
            starts.append(len(tokens) - len(continuation))
        results = self._score(sequences, starts)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._score([c + t for c, t in windows], [len(c) for c, _ in windows])
            out.append(sum(s for s, _ in scores))
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from vllm import SamplingParams

        prompts, params = [], []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            max_tokens = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            tokens = self.tok_encode(context)[-(self.max_length - max_tokens):]
            prompts.append({"prompt_token_ids": tokens})
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=until or None))
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outputs]
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def parse_setting(text: str) -> Any:
    """``--coefficients``: a JSON object {name: value} or list, or ``name=value,...``."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"--coefficients {text}: not valid JSON ({error.msg})") from None
    setting = {}
    for part in text.split(","):
        name, sep, value = part.rpartition("=")
        if not sep or not name:
            raise UserError(f"--coefficients {text}: expected name=value[,name=value] or JSON")
        setting[name.strip()] = value.strip()
    return setting


def run_eval(recipe_path: str, tasks: Sequence[str], settings: Sequence[Any] = (), include_path: Optional[str] = None,
             limit: Optional[float] = None, open_engine: Optional[Callable[[Any, Mapping[str, Any]], Any]] = None,
             ) -> List[Dict[str, Any]]:
    """Score ``tasks`` at each coefficient setting (default: the recipe's own) on one
    engine; returns one row per setting: {"coefficients", "results": lm-eval's
    per-task metrics}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mergekit_rlvr.decompose import load_recipe
    from mergekit_rlvr.search.engine import close_engine
    from mergekit_rlvr.search.runner import recipe_coefficients
    from mergekit_rlvr.search.engine import open_engine as open_hotswap
    from mergekit_rlvr.search.settings import load_settings

    recipe = load_recipe(recipe_path)
    engine_kwargs = dict(load_settings(recipe.get("search"), None, str(recipe.get("merge_method", ""))).engine)
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise UserError(f"--tasks: unknown task {missing[0]!r} (add --include-path for your own task YAMLs)")
    engine = (open_engine or (lambda r, k: open_hotswap(r, k)[0]))(recipe_path, engine_kwargs)
    try:
        lm = HotSwapLM(engine)
        recipe_values = recipe_coefficients(recipe)
        rows = []
        for setting in list(settings) or [None]:
            if setting is None or isinstance(setting, Mapping):  # names left out: the recipe's value
                engine.set_coefficients({**recipe_values, **(setting or {})})
            else:
                engine.set_coefficients(setting)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          log_samples=False)
            results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
                       for task, metrics in out["results"].items()}
            rows.append({"coefficients": dict(engine.coefficients), "results": results})
        return rows
    finally:
        if open_engine is None:
            close_engine(engine)


def score_table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table: one row per setting, one column per task metric."""
    columns = sorted({(t, m) for r in rows for t, ms in r["results"].items() for m in ms
                      if "stderr" not in m and m != "sample_len"})
    names = list(rows[0]["coefficients"]) if rows else []
    head = "| " + " | ".join(names + [f"{t} {m}" for t, m in columns]) + " |"
    lines = [head, "|" + " --- |" * (len(names) + len(columns))]
    for r in rows:
        cells = [f"{r['coefficients'][n]:.4g}" for n in names]
        for t, m in columns:
            value = r["results"].get(t, {}).get(m)
            cells.append("" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
