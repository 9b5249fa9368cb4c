"""Final answers out of sampled responses, and majority voting over them (paper 000, Eq. 4).

Extraction follows the DoTS authors' order of fallbacks: an ``<answer>...</answer>``
span, else the last ``\\boxed{...}`` (here with balanced braces, so ``\\boxed{\\frac{1}{2}}``
is whole), else a number after "The answer is" / "Answer:" / "Result:", else the last
number in the text; otherwise there is no answer (``None``).

Voting groups answers that math-verify finds equivalent (``1/2``, ``\\frac{1}{2}`` and
``0.5`` vote together); answers math-verify cannot parse vote by their normalized text.
A plain word of two or more letters (``yes``, ``iqho``; ``pi`` too) is
compared as text: math-verify would read it as a product of one-letter variables, so
that anagrams vote together (``qnye`` = ``nyqe``), and slowly (tens of ms per pair).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS = re.compile(r"(?:The answer is|Answer:|Result:)\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_WORD = re.compile(r"[a-z]{2,}")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` whose braces balance, or None."""
    found = None
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
    return None if found is None else found.strip()


def extract_answer(text: str) -> Optional[str]:
    """The response's final answer as a string, or None when there is none."""
    stripped = text.strip()
    tagged = _ANSWER_TAG.findall(stripped)
    if tagged and tagged[0].strip():
        return tagged[0].strip()
    boxed = last_boxed(stripped)
    if boxed:
        return boxed
    match = _ANSWER_IS.search(stripped)
    if match:
        return match.group(1)
    numbers = _NUMBER.findall(stripped)
    if numbers:
        return numbers[-1]
    return None


def normalize_text(answer: str) -> str:
    """Plain-text key for answers math-verify cannot parse."""
    text = answer.strip().strip("$").strip()
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".").lower()


def _timeout():
    # math-verify times out through SIGALRM, which only works in the main thread
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parsed(answer: str):
    from math_verify import parse

    try:
        result = parse(answer, parsing_timeout=_timeout())
        if not result:
            result = parse(f"${answer}$", parsing_timeout=_timeout())
    except Exception:  # noqa: BLE001 - an unparseable answer votes by its text
        return None
    return result or None


@lru_cache(maxsize=65536)
def equivalent(a: str, b: str) -> bool:
    """Whether two extracted answers mean the same thing."""
    ta, tb = normalize_text(a), normalize_text(b)
    if a == b or ta == tb:
        return True
    if _WORD.fullmatch(ta) or _WORD.fullmatch(tb):  # a word, not a product of variables
        return False
    pa, pb = _parsed(a), _parsed(b)
    if pa is None or pb is None:
        return False
    from math_verify import verify

    try:
        return bool(verify(pa, pb, timeout_seconds=_timeout())) or bool(verify(pb, pa, timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001
        return False


#: ``eq4``: paper 000 Eq. 4, max over answers y of the share of the m samples equal to y
#: (unparseable samples count in m but never form a class; ties cannot depend on sample
#: order); ``authors``: the authors' code, where unparseable samples form one class and
#: a query whose (first-seen) largest class is that one scores 0
RULES = ("eq4", "authors")


@dataclass(frozen=True)
class Vote:
    """Majority answer (None: none, or the unparseable class), its votes and the
    number of samples m."""

    answer: Optional[str]
    votes: int
    samples: int

    @property
    def consistency(self) -> float:
        """Eq. 4's C(x) = votes / m; 0 when the majority is unparseable (``authors``)."""
        if self.answer is None or self.samples == 0:
            return 0.0
        return self.votes / self.samples


def group_answers(answers: Sequence[Optional[str]], rule: str = "eq4") -> List[Tuple[Optional[str], int]]:
    """Clusters of equivalent answers as (representative, count), largest first.

    ``eq4``: missing answers form no cluster; ties between clusters go to the one
    whose smallest normalized member sorts first (not to sample order).
    ``authors``: missing answers form one cluster (representative None); ties keep
    the order in which the clusters first appeared."""
    if rule not in RULES:
        raise ValueError(f"consistency rule must be one of {', '.join(RULES)}, got {rule!r}")
    clusters: List[List] = []  # [representative, count, first index, members]
    for index, answer in enumerate(answers):
        if answer is None and rule == "eq4":
            continue
        for cluster in clusters:
            same = cluster[0] is None if answer is None else (
                cluster[0] is not None and equivalent(cluster[0], answer))
            if same:
                cluster[1] += 1
                cluster[3].append(answer)
                break
        else:
            clusters.append([answer, 1, index, [answer]])
    if rule == "eq4":
        clusters.sort(key=lambda c: (-c[1], min((normalize_text(a), a) for a in c[3])))
    else:
        clusters.sort(key=lambda c: (-c[1], c[2]))
    return [(c[0], c[1]) for c in clusters]


def majority_vote(answers: Sequence[Optional[str]], rule: str = "eq4") -> Vote:
    """Eq. 4's argmax over equivalence classes of answers, out of all len(answers) samples."""
    groups = group_answers(answers, rule)
    if not groups:
        return Vote(None, 0, len(answers))
    answer, votes = groups[0]
    return Vote(answer, votes, len(answers))


def consistency(responses: Sequence[str], rule: str = "eq4") -> float:
    """C(x) of Eq. 4 from raw responses."""
    return majority_vote([extract_answer(r) for r in responses], rule).consistency
