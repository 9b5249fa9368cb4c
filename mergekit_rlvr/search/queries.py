"""Query files (JSONL with ``prompt`` and optional ``answer``, or parquet with a
``prompt`` column, the DoTS data format) and difficulty-aware selection (paper 000,
Sec. 4.2 and Alg. 1 stage 1)."""

from __future__ import annotations

import ast
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from mergekit_rlvr.errors import UserError


@dataclass
class Query:
    prompt: str
    answer: Optional[str] = None
    row: Dict[str, Any] = field(default_factory=dict)  # the whole input row, written back by select-queries


def _prompt_text(raw: Any) -> str:
    """A prompt is text, or chat messages (the DoTS parquet files): take the user turn."""
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                raw = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return raw
        else:
            return raw
    if isinstance(raw, list):
        users = [m.get("content", "") for m in raw if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return str(users[0])
        if raw and isinstance(raw[-1], dict):
            return str(raw[-1].get("content", ""))
    return "" if raw is None else str(raw)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _rows_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg})")
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object with a 'prompt' field")
            rows.append(row)
    return rows


def _rows_parquet(path: str) -> List[Dict[str, Any]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one line
        raise UserError(f"{path}: cannot read parquet ({error})")
    return [_jsonable(row) for row in table.to_pylist()]


def load_queries(path: str) -> List[Query]:
    """Every row of a JSONL or parquet file as a Query; rows need a non-empty prompt."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such query file")
    rows = _rows_parquet(path) if path.endswith(".parquet") else _rows_jsonl(path)
    queries = []
    for number, row in enumerate(rows, 1):
        if "prompt" not in row:
            raise UserError(f"{path}: row {number} has no 'prompt' field")
        prompt = _prompt_text(row["prompt"])
        if not prompt.strip():
            raise UserError(f"{path}: row {number} has an empty prompt")
        answer = row.get("answer")
        queries.append(Query(prompt, None if answer is None else str(answer), row))
    if not queries:
        raise UserError(f"{path}: no queries")
    return queries


def difficulty(consistencies: Sequence[float]) -> float:
    """D(x) = 1 - mean over source models of C(x) (Eq. 5; the mean for more than two)."""
    return 1.0 - sum(consistencies) / len(consistencies)


@dataclass(frozen=True)
class Selected:
    index: int  # position in the pool
    difficulty: float
    split: str  # "low" or "medium"


def select_by_difficulty(difficulties: Sequence[float], n: int, threshold: float = 0.8, seed: int = 0) -> List[Selected]:
    """Alg. 1 stage 1: drop D > threshold, split the rest at the median (sorted by D,
    ties by pool order; the lower half is the first len // 2, as the authors' code),
    sample n // 2 from each half (all of a half that is smaller). Returned in pool order."""
    kept = sorted((d, i) for i, d in enumerate(difficulties) if d <= threshold)
    middle = len(kept) // 2
    halves = {"low": kept[:middle], "medium": kept[middle:]}
    rng = random.Random(seed)
    per_half = {"low": n // 2, "medium": n - n // 2}
    chosen = []
    for split, members in halves.items():
        take = min(per_half[split], len(members))
        for d, i in rng.sample(members, take):
            chosen.append(Selected(i, d, split))
    return sorted(chosen, key=lambda s: s.index)
