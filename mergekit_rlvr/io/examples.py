"""The Fisher's validation file: JSONL rows with string fields ``prompt`` and
``answer``, streamed and checked line by line (``mergekit-rlvr fisher --data``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Optional

from mergekit_rlvr.errors import UserError


@dataclass(frozen=True)
class Row:
    line: int
    prompt: str
    answer: str


def read_rows(path: str, limit: Optional[int] = None) -> Iterator[Row]:
    """Rows of a JSONL file with string fields ``prompt`` and ``answer``, streamed.
    Blank lines are skipped; anything else that is not such a row is a UserError
    naming the file and line."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist") from None
    except (OSError, UnicodeError) as error:
        raise UserError(f"data file {path} is not readable: {error}") from None
    count = 0
    with handle:
        line_no = 0
        while limit is None or count < limit:
            try:
                text = handle.readline()
            except UnicodeError as error:
                raise UserError(f"data file {path} line {line_no + 1}: not UTF-8 text ({error})") from None
            if not text:
                break
            line_no += 1
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise UserError(f"data file {path} line {line_no}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"data file {path} line {line_no}: a row must be a JSON object with prompt and answer")
            for key in ("prompt", "answer"):
                if key not in row:
                    raise UserError(f"data file {path} line {line_no}: row has no '{key}'")
                if not isinstance(row[key], str):
                    raise UserError(f"data file {path} line {line_no}: '{key}' must be a string")
            if not row["answer"]:
                raise UserError(f"data file {path} line {line_no}: 'answer' is empty (nothing to score)")
            count += 1
            yield Row(line_no, row["prompt"], row["answer"])


def count_rows(path: str, limit: Optional[int] = None) -> int:
    """Validate the whole file (before any model is loaded) and count its rows."""
    if limit is not None and limit < 1:
        raise UserError(f"--max-examples must be >= 1, got {limit}")
    count = sum(1 for _ in read_rows(path, limit))
    if count == 0:
        raise UserError(f"data file {path} holds no examples (rows with prompt and answer)")
    return count
