"""Query files (JSONL with ``prompt`` and optional ``answer``, or parquet with a
``prompt`` column, the DoTS data format: the verl layout, ``prompt`` a list of chat
messages and the answer under ``reward_model.ground_truth``) and difficulty-aware selection (paper 000,
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
    messages: Optional[List[Dict[str, str]]] = None  # the row's chat messages, when its prompt is a list of them


def _messages(raw: Any) -> Optional[List[Dict[str, str]]]:
    """The prompt as chat messages (the verl layout of the DoTS data: a list of
    {role, content}, often with a system turn), or None for a text prompt."""
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if isinstance(raw, str) and raw.strip().startswith("[") and raw.strip().endswith("]"):
        try:
            raw = ast.literal_eval(raw.strip())
        except (SyntaxError, ValueError):
            return None
    if isinstance(raw, list) and raw and all(isinstance(m, dict) and "role" in m for m in raw):
        return [{"role": str(m["role"]), "content": str(m.get("content", ""))} for m in raw]
    return None


def _answer(row: Dict[str, Any]) -> Optional[str]:
    """``answer``, else the verl layout's ``reward_model.ground_truth`` (reported only)."""
    answer = row.get("answer")
    if answer is None:
        reward = row.get("reward_model")
        if isinstance(reward, str):
            try:
                reward = json.loads(reward)
            except json.JSONDecodeError:
                reward = None
        if isinstance(reward, dict):
            answer = reward.get("ground_truth")
    if hasattr(answer, "tolist"):
        answer = answer.tolist()
    return None if answer is None else str(answer)


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
        queries.append(Query(prompt, _answer(row), row, _messages(row["prompt"])))
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
    split: str  # "low", "medium" (or "hard": D above the threshold, random/diverse only)


STRATEGIES = ("stratified", "easy", "medium", "random", "diverse")
#: difficulties are rationals with small denominators; compare to the threshold with this slack
_SLACK = 1e-9


def _halves(difficulties: Sequence[float], threshold: float):
    """Kept queries (D <= threshold) sorted by D, ties by pool order, split at the
    median: the lower half is the first len // 2, as the authors' code."""
    kept = sorted((d, i) for i, d in enumerate(difficulties) if d <= threshold + _SLACK)
    middle = len(kept) // 2
    return {"low": kept[:middle], "medium": kept[middle:]}


def select_by_difficulty(difficulties: Sequence[float], n: int, threshold: float = 0.8, seed: int = 0,
                         easy_fraction: float = 0.5) -> List[Selected]:
    """Alg. 1 stage 1: drop D > threshold, split the rest at the median, sample
    floor(n * easy_fraction) from the low half and the rest from the medium half
    (all of a half that is smaller). Sec. 4.2 samples equally (0.5); Table 7 varies
    the easy:medium ratio. Returned in pool order."""
    if not 0.0 <= easy_fraction <= 1.0:
        raise UserError(f"--easy-fraction must be in [0, 1], got {easy_fraction}")
    halves = _halves(difficulties, threshold)
    rng = random.Random(seed)
    low = int(n * easy_fraction + _SLACK)
    per_half = {"low": low, "medium": n - low}
    chosen = []
    for split, members in halves.items():
        take = min(per_half[split], len(members))
        for d, i in rng.sample(members, take):
            chosen.append(Selected(i, d, split))
    return sorted(chosen, key=lambda s: s.index)


def _split_of(difficulties: Sequence[float], threshold: float) -> Dict[int, str]:
    halves = _halves(difficulties, threshold)
    out = {i: "hard" for i in range(len(difficulties))}
    out.update({i: split for split, members in halves.items() for _, i in members})
    return out


def select_queries(difficulties: Sequence[float], n: int, threshold: float = 0.8, seed: int = 0,
                   strategy: str = "stratified", easy_fraction: float = 0.5,
                   groups: Optional[Sequence[str]] = None) -> List[Selected]:
    """The adaptation set by ``strategy`` (paper 000, Sec. 4.2 and Tables 7-8):

    - ``stratified``: Alg. 1 (``easy_fraction`` of n from the low half; 0.5 = balanced);
    - ``easy`` / ``medium``: all n from the low / medium half (Table 8's "easy only",
      "medium only"; Table 7's 100:0 and 0:100);
    - ``random``: n uniformly from the whole pool, difficulty unused (Table 8 "random");
    - ``diverse``: equal numbers per data source (``groups``, one label per query),
      drawn at random within each, difficulty unused (Table 8 "diverse").

    ``split`` says where each pick falls: low, medium, or hard (D > threshold)."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy in ("stratified", "easy", "medium"):
        fraction = {"easy": 1.0, "medium": 0.0}.get(strategy, easy_fraction)
        return select_by_difficulty(difficulties, n, threshold, seed, fraction)
    rng = random.Random(seed)
    count = len(difficulties)
    if strategy == "random":
        picked = rng.sample(range(count), min(n, count))
    else:
        labels = list(groups) if groups is not None else ["" for _ in range(count)]
        members: Dict[str, List[int]] = {}
        for i, label in enumerate(labels):
            members.setdefault(label, []).append(i)
        queues = [rng.sample(members[label], len(members[label])) for label in sorted(members)]
        picked = []
        while len(picked) < min(n, count):  # round robin: equal per source, the rest where any is left
            for queue in queues:
                if queue and len(picked) < n:
                    picked.append(queue.pop())
    split = _split_of(difficulties, threshold)
    return sorted((Selected(i, difficulties[i], split[i]) for i in picked), key=lambda s: s.index)
