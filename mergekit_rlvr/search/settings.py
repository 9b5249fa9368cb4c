"""The recipe's ``search:`` block, its defaults and the command-line overrides.

Defaults follow the papers (DoTS: TPE on [0, 2], 5 samples, temperature 0.6, 8192
tokens, the front's highest consistency; reasoning interpolation: rho_min 0.9, binary
search of at most 8 steps on [0, 1], short-prefix detection). The DoTS authors' code
choices are options: ``sampler: nsga2``, ``bounds: [0.5, 2.0]``, ``samples: 7``,
``consistency: authors``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from mergekit_rlvr.errors import UserError

#: the DoTS authors' instruction appended to each question (their build_reasoning_prompt)
DEFAULT_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."

SAMPLERS = ("tpe", "nsga2", "random")
PERPLEXITY = ("prompt", "response")
SELECT = ("max_consistency", "knee")
CONSISTENCY = ("eq4", "authors")  # mergekit_rlvr.search.answers.RULES
PROMPT_FORMATS = ("question", "messages")
STRATEGIES = ("binary", "grid")
DETECT = ("prefix", "logit", "full")


@dataclass
class SearchSettings:
    objective: str = "dots"
    trials: int = 100
    sampler: str = "tpe"
    bounds: Tuple[float, float] = (0.0, 2.0)
    samples: int = 5
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens: int = 8192
    perplexity: str = "prompt"
    select: str = "max_consistency"
    # Eq. 4 (unparseable samples count in m, never form a class) or the authors' code
    # (an unparseable majority scores 0)
    consistency: str = "eq4"
    seed: int = 0
    # sample query i with seed + i in every trial (common random numbers across trials);
    # off by default: vLLM CPU 0.32 fails on seeded requests whose prefill is chunked
    sample_seeds: bool = False
    # prompts: "chat" applies the tokenizer's chat template to one user message
    # (question + instruction); anything else is a format string with {prompt}
    template: str = "chat"
    instruction: str = DEFAULT_INSTRUCTION
    # "question": the prompt's user turn + instruction, as above; "messages": a query
    # file's chat messages (the verl layout, system turn included) as given, through
    # the tokenizer's chat template (no instruction added)
    prompt_format: str = "question"
    # coefficients to search (default: all of HotSwapLLM.coefficients); others stay fixed
    coefficients: Optional[List[str]] = None
    # one coefficient per module group (mergekit_rlvr.groups): true, [attention, mlp, ...] or {name: [filters]}
    groups: Any = None
    # Optuna
    storage: Optional[str] = None
    study_name: Optional[str] = None  # stored as given; default search-<objective>
    # Optuna's heartbeat: a trial silent for grace_period seconds is failed (and its
    # point retried, dots); seconds, integers as Optuna takes them
    heartbeat_interval: int = 10
    grace_period: int = 30
    prune: bool = False
    chunks: int = 4
    # reasoning_rate (paper 003)
    rho_min: float = 0.9
    strategy: str = "binary"
    max_steps: int = 8
    grid: int = 10
    detect: str = "prefix"
    prefix_tokens: int = 16
    think_start: str = "<think>"
    think_end: str = "</think>"
    # vLLM engine keyword arguments
    engine: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["bounds"] = list(self.bounds)
        return out


def _fail(key: str, message: str):
    raise UserError(f"search.{key}: {message}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    if key == "bounds":
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            _fail(key, f"expected [low, high], got {value!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            _fail(key, f"expected finite low < high, got {value!r}")
        return (lo, hi)
    if key == "engine":
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping of vLLM keyword arguments, got {value!r}")
        return dict(value)
    if key == "coefficients":
        if value is None:
            return None
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            _fail(key, f"expected a list of coefficient names, got {value!r}")
        return list(value)
    if key == "groups":
        from mergekit_rlvr.groups import parse

        parse(value)  # errors name search.groups
        return value
    if key in ("storage", "study_name"):
        if key == "study_name" and (not isinstance(value, str) or not value.strip()):
            _fail(key, f"expected a non-empty name, got {value!r}")
        return None if value is None else str(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            _fail(key, f"expected an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    return value


def _check(s: SearchSettings) -> SearchSettings:
    from mergekit_rlvr.search.objective import OBJECTIVES

    for key, allowed in (
        ("objective", tuple(OBJECTIVES)), ("sampler", SAMPLERS), ("perplexity", PERPLEXITY),
        ("select", SELECT), ("consistency", CONSISTENCY), ("prompt_format", PROMPT_FORMATS),
        ("strategy", STRATEGIES), ("detect", DETECT),
    ):
        if getattr(s, key) not in allowed:
            _fail(key, f"{getattr(s, key)!r} is not one of {', '.join(allowed)}")
    for key in ("trials", "samples", "max_tokens", "max_steps", "grid", "prefix_tokens", "chunks",
                "heartbeat_interval", "grace_period"):
        if getattr(s, key) < 1:
            _fail(key, f"must be at least 1, got {getattr(s, key)}")
    if s.grace_period <= s.heartbeat_interval:
        _fail("grace_period", f"must exceed heartbeat_interval ({s.heartbeat_interval}), got {s.grace_period}")
    if not 0.0 < s.temperature or not 0.0 < s.top_p <= 1.0:
        _fail("temperature" if s.temperature <= 0 else "top_p", "out of range")
    if not 0.0 <= s.rho_min <= 1.0:
        _fail("rho_min", f"must be in [0, 1], got {s.rho_min}")
    if s.template != "chat" and "{prompt}" not in s.template:
        _fail("template", "must be 'chat' or a format string containing {prompt}")
    if not s.think_start or not s.think_end:
        _fail("think_start" if not s.think_start else "think_end", "must not be empty")
    return s


def load_settings(
    block: Optional[Dict[str, Any]], overrides: Optional[Dict[str, Any]] = None, merge_method: str = ""
) -> SearchSettings:
    """Settings from a recipe's ``search:`` block, then ``overrides`` (flags) on top.
    The objective defaults to reasoning_rate for reasoning_interp recipes
    (``mergekit_rlvr.search.objective``), whose defaults it then applies."""
    block = dict(block or {})
    if not isinstance(block, dict):
        raise UserError(f"search: expected a mapping, got {block!r}")
    merged = {**block, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    known = {f.name: f for f in fields(SearchSettings)}
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise UserError(f"search.{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})")
    from mergekit_rlvr.search.objective import OBJECTIVES, default_objective

    objective = merged.get("objective") or default_objective(merge_method)
    settings = SearchSettings(objective=objective)
    if objective in OBJECTIVES:  # else refused by _check below
        for key, value in OBJECTIVES[objective].defaults.items():
            setattr(settings, key, value)
    for key, value in merged.items():
        if key == "objective":
            continue
        setattr(settings, key, _coerce(key, value, getattr(SearchSettings(), key)))
    return _check(settings)
