"""The math of paper 001's Eq. 13 on any module returning logits: one example's
tokens, log p(answer | prompt), and the mean squared per-example gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.io.examples import Row


def encode(tokenizer, row: Row, *, chat_template: bool = False, add_eos: bool = False,
           source: str = "data") -> Tuple[torch.Tensor, int]:
    """(token ids, number of prompt tokens). Prompt and answer are tokenized
    separately and concatenated, so the split between context and targets is exact
    (joint tokenization can merge tokens across the boundary)."""
    if chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": row.prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
            prompt_ids = prompt_ids["input_ids"]
    else:
        prompt_ids = tokenizer(row.prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(row.answer, add_special_tokens=False)["input_ids"]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise UserError("--add-eos: the tokenizer has no eos token")
        answer_ids = list(answer_ids) + [tokenizer.eos_token_id]
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    if not answer_ids:
        raise UserError(f"{source} line {row.line}: the answer has no tokens")
    if not prompt_ids:
        raise UserError(
            f"{source} line {row.line}: the prompt has no tokens (and the tokenizer adds no BOS),"
            " so the first answer token has no context"
        )
    return torch.tensor(prompt_ids + answer_ids, dtype=torch.long), len(prompt_ids)


def answer_log_prob(model: torch.nn.Module, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """log p(answer | prompt) = sum over answer positions t of log p(ids[t] | ids[:t]).
    ``model(input_ids=...)`` returns logits (a tensor or an object with ``.logits``)."""
    out = model(input_ids=ids.unsqueeze(0))
    logits = out.logits if hasattr(out, "logits") else out
    logits = logits[0, n_prompt - 1 : ids.numel() - 1].float()  # the positions predicting answer tokens
    targets = ids[n_prompt:].to(logits.device)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).sum()


@dataclass
class FisherResult:
    """Mean squared per-example gradient (float64) per parameter (named as in
    ``model.named_parameters()``, tied parameters once)."""

    values: Dict[str, torch.Tensor]
    examples: int
    mean_log_prob: float = float("nan")
    extra: Dict[str, object] = field(default_factory=dict)


def _square_sums(params, accumulate_device):
    """(name -> float64 zeros, hook handles): each parameter's post-accumulate-grad
    hook adds its squared gradient to its sum and frees the gradient at once."""
    sums = {
        n: torch.zeros(p.shape, dtype=torch.float64, device=accumulate_device or p.device) for n, p in params
    }

    def hook(name):
        acc = sums[name]

        def add_square(p):
            acc.add_(p.grad.to(device=acc.device, dtype=torch.float64).square_())
            p.grad = None

        return add_square

    return sums, [p.register_post_accumulate_grad_hook(hook(n)) for n, p in params]


def diagonal_fisher(
    model: torch.nn.Module,
    examples: Iterable[Tuple[torch.Tensor, int]],
    *,
    total: Optional[int] = None,
    device: Optional[torch.device] = None,
    accumulate_device: Optional[torch.device] = None,
    progress: bool = True,
    describe: Callable[[int], str] = lambda i: f"example {i + 1}",
) -> FisherResult:
    """Eq. 13 over ``examples`` = (ids, n_prompt) pairs, one backward pass each.

    Squared gradients are added to float64 sums by post-accumulate-grad hooks and
    the gradient is freed at once, so peak memory is the model, the sums and one
    example's activations. ``accumulate_device`` (default: each parameter's own)
    may be "cpu" to keep the float64 sums off an accelerator."""
    from tqdm import tqdm

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters to take gradients of")
    device = device or params[0][1].device
    sums, handles = _square_sums(params, accumulate_device)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    count, log_prob_sum = 0, 0.0
    try:
        with torch.enable_grad():
            for ids, n_prompt in tqdm(examples, total=total, desc="fisher", unit="ex", disable=not progress):
                model.zero_grad(set_to_none=True)
                log_prob = answer_log_prob(model, ids.to(device), n_prompt)
                value = float(log_prob.detach())
                if not math.isfinite(value):
                    raise UserError(f"{describe(count)}: log p(answer | prompt) is {value} (try --dtype float32)")
                log_prob.backward()
                log_prob_sum += value
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise UserError("no examples to compute the Fisher information on")
    for name, acc in sums.items():
        acc.div_(count)
        if not bool(torch.isfinite(acc).all()):
            raise UserError(f"the Fisher values of {name} are not finite (gradients overflowed; try --dtype float32)")
    return FisherResult(sums, count, log_prob_sum / count)
