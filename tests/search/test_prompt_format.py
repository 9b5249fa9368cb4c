"""`prompt_format: messages` (verl-layout query files) on every path that builds prompts
from queries: the dots objective's generation prompts, select-queries' prompts (both
``query_prompts``) and the reasoning-rate objective's prompts; known answers from a real
tokenizer (the toy family's character tokenizer) with a role-marking chat template."""

from __future__ import annotations

import pytest

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search.dots import dots_prompts
from mergekit_rlvr.search.prompts import query_prompts
from mergekit_rlvr.search.queries import Query
from mergekit_rlvr.search.reasoning import reasoning_prompts
from mergekit_rlvr.search.settings import load_settings
from mergekit_rlvr.toy.tiny import char_tokenizer

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
MESSAGES = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "What is 6*7?"}]


@pytest.fixture(scope="module")
def tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def queries():
    # a verl row (chat messages with a system turn) and a plain-text row
    return [Query("What is 6*7?", "42", {}, MESSAGES), Query("What is 2+2?", "4")]


def test_messages_rendered_as_given_on_every_prompt_path(tokenizer):
    as_given = load_settings({"prompt_format": "messages"})
    rendered = ["[system]Be careful.[user]What is 6*7?[assistant]", "[user]What is 2+2?[assistant]"]
    assert query_prompts(tokenizer, queries(), as_given) == rendered  # dots generation and select-queries
    generation, perplexity = dots_prompts(tokenizer, queries(), as_given)
    assert generation == rendered
    # perplexity prompts stay the question alone (the authors' perplexity), in both formats
    assert perplexity == ["[user]What is 6*7?[assistant]", "[user]What is 2+2?[assistant]"]
    # the reasoning-rate objective: the messages as given, then the start marker
    assert reasoning_prompts(tokenizer, queries(), as_given) == [p + "<think>" for p in rendered]


def test_question_format_unchanged(tokenizer):
    default = load_settings({})
    instruction = default.instruction
    assert instruction and query_prompts(tokenizer, queries(), default) == [
        f"[user]What is 6*7?{instruction}[assistant]", f"[user]What is 2+2?{instruction}[assistant]"]
    assert reasoning_prompts(tokenizer, queries(), default) == [
        "[user]What is 6*7?[assistant]<think>", "[user]What is 2+2?[assistant]<think>"]


def test_messages_need_a_chat_template():
    plain = char_tokenizer()
    plain.chat_template = None
    for build in (query_prompts, reasoning_prompts):
        with pytest.raises(UserError, match="chat template"):
            build(plain, queries(), load_settings({"prompt_format": "messages"}))
