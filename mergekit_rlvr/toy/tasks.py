"""The toy family's two tasks, their held-out evaluation sets and the unlabeled pool.

Task K (knowledge): a secret lexicon. Every lowercase letter has a fixed
"Zorbish" letter (a seeded permutation of the alphabet: 26 facts). A query asks
for the Zorbish spelling of a 4-letter word::

    Q:zorb(cabd)?A:\\boxed{qvxe}

Nothing but supervision can reveal the table (a random guess is right with
probability 26^-4), so reward-only training cannot learn it; SFT on labelled
words does. Evaluation words are disjoint from training words, so accuracy
measures the learned table, not memorized strings.

Task R (skill): two-digit addition that needs a carry, answered with a short
worked solution (units, then tens)::

    Q:47+38=?A:7+8=15,4+3+1=8,\\boxed{85}

The pretraining corpus writes such sums "carelessly" (the carry dropped:
``4+3=7,\\boxed{75}``) in a fixed share of its examples, so the base model can
add but usually forgets to carry: weak but not zero, the situation in which RL
with a verifiable reward has signal (sampled answers are sometimes right).
Evaluation pairs are disjoint from every pair used in training.

Texts contain no spaces or newlines: saved next to a Qwen2 config, the character
tokenizer is loaded by transformers (and vLLM) as Qwen2's byte-level tokenizer,
which maps ASCII characters other than whitespace to the same ids.
Both prompts have a fixed length (two-digit operands, four-letter words), which
lets training sample groups without padding. Answers are scored by the exact
content of the last ``\\boxed{...}``.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

LETTERS = string.ascii_lowercase
WORD_LEN = 4
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Example:
    task: str  # "K" or "R"
    prompt: str
    answer: str

    @property
    def completion(self) -> str:
        return boxed(self.answer)

    def to_json(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "answer": self.answer}


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} in ``text``, or None."""
    found = _BOXED.findall(text or "")
    return found[-1].strip() if found else None


def is_correct(text: str, answer: str) -> bool:
    got = extract_boxed(text)
    return got is not None and got == answer


# ---------------------------------------------------------------- task K

def lexicon(seed: int) -> Dict[str, str]:
    """The secret letter table: a permutation of a-z with no fixed point."""
    rng = random.Random(f"lexicon-{seed}")
    while True:
        target = list(LETTERS)
        rng.shuffle(target)
        if all(a != b for a, b in zip(LETTERS, target)):
            return dict(zip(LETTERS, target))


def k_prompt(word: str) -> str:
    return f"Q:zorb({word})?A:"


def translate(word: str, table: Dict[str, str]) -> str:
    return "".join(table[c] for c in word)


def _split(key: str, seed: int) -> str:
    """Stable split of every possible input into train / eval / pool (80/10/10)."""
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) % 10
    return "eval" if h == 0 else "pool" if h == 1 else "train"


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(WORD_LEN))


def k_example(word: str, table: Dict[str, str]) -> Example:
    return Example("K", k_prompt(word), translate(word, table))


def k_words(split: str, count: int, seed: int, stream: str) -> List[str]:
    rng = random.Random(f"k-{stream}-{seed}")
    words, seen = [], set()
    while len(words) < count:
        w = random_word(rng)
        if w not in seen and _split(w, seed) == split:
            seen.add(w)
            words.append(w)
    return words


# ---------------------------------------------------------------- task R

def r_prompt(a: int, b: int) -> str:
    return f"Q:{a}+{b}=?A:"


def carries(a: int, b: int) -> bool:
    """True when the units digits sum to 10 or more."""
    return a % 10 + b % 10 >= 10


def worked_sum(a: int, b: int, careless: bool = False) -> str:
    """The worked solution ending in the boxed sum; ``careless`` drops the carry."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10
    if units >= 10 and not careless:
        tens_text = f"{a // 10}+{b // 10}+1={tens + 1}"
        tens += 1
    else:
        tens_text = f"{a // 10}+{b // 10}={tens}"
    return f"{a % 10}+{b % 10}={units},{tens_text}," + boxed(str(tens * 10 + units % 10))


def careless_sum(a: int, b: int) -> int:
    return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10


def r_pairs(split: str, seed: int, carry_only: bool = True) -> List[tuple]:
    return [(a, b) for a in range(10, 100) for b in range(10, 100)
            if _split(f"{a}+{b}", seed) == split and (carries(a, b) or not carry_only)]


def r_example(a: int, b: int) -> Example:
    return Example("R", r_prompt(a, b), str(a + b))


# ---------------------------------------------------------------- sets

def eval_sets(size: int = 200, seed: int = 0) -> Dict[str, List[Example]]:
    """Held-out K and R sets of ``size`` each (inputs never seen in any training)."""
    table = lexicon(seed)
    words = k_words("eval", size, seed, "eval")
    pairs = r_pairs("eval", seed)
    random.Random(f"r-eval-{seed}").shuffle(pairs)
    return {
        "K": [k_example(w, table) for w in words],
        "R": [r_example(a, b) for a, b in pairs[:size]],
    }


def query_pool(size: int = 200, seed: int = 0) -> List[Example]:
    """An unlabeled pool for query selection and coefficient search: half K, half R,
    inputs disjoint from training and evaluation. Answers are kept only so that a
    report can score the pool; the search must use the prompts alone."""
    table = lexicon(seed)
    half = size // 2
    words = k_words("pool", size - half, seed, "pool")
    pairs = r_pairs("pool", seed)
    random.Random(f"r-pool-{seed}").shuffle(pairs)
    items = [k_example(w, table) for w in words] + [r_example(a, b) for a, b in pairs[:half]]
    random.Random(f"pool-{seed}").shuffle(items)
    return items


class TrainStreams:
    """Seeded generators of training text for the three stages."""

    def __init__(self, seed: int = 0, careless: float = 0.6):
        self.seed = seed
        self.careless = careless
        self.table = lexicon(seed)
        self.pairs = r_pairs("train", seed)  # task R: carry needed
        self.all_pairs = r_pairs("train", seed, carry_only=False)  # the corpus: all sums

    def pretrain_doc(self, rng: random.Random) -> str:
        """One pretraining document: (30%) a K-format query answered with a random
        table (format only, no knowledge), or a sum written carelessly with
        probability ``careless`` (which matters only when a carry is needed)."""
        if rng.random() < 0.3:
            word = random_word(rng)
            fake = "".join(rng.choice(LETTERS) for _ in word)
            return k_prompt(word) + boxed(fake)
        a, b = rng.choice(self.all_pairs)
        return r_prompt(a, b) + worked_sum(a, b, careless=rng.random() < self.careless)

    def sft_example(self, rng: random.Random) -> Example:
        while True:
            word = random_word(rng)
            if _split(word, self.seed) == "train":
                return k_example(word, self.table)

    def rl_prompt(self, rng: random.Random) -> Example:
        a, b = rng.choice(self.pairs)
        return r_example(a, b)


def union_accuracy(per_task: Dict[str, float], sizes: Dict[str, int]) -> float:
    total = sum(sizes.values())
    return sum(per_task[t] * sizes[t] for t in per_task) / total if total else 0.0


def score(texts: Sequence[str], examples: Sequence[Example]) -> List[bool]:
    return [is_correct(t, e.answer) for t, e in zip(texts, examples)]
