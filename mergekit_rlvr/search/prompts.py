"""What is sent to the engine for a query: the prompt text (the tokenizer's chat
template or a format string, the instruction appended, or a row's chat messages as
given) and the sampling parameters of the search settings."""

from __future__ import annotations

from typing import Optional, Sequence

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


def sampling_params(settings: SearchSettings, seed: int, **overrides):
    from vllm import SamplingParams

    values = dict(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                  max_tokens=settings.max_tokens, seed=seed if settings.sample_seeds else None)
    values.update(overrides)
    return SamplingParams(**values)
