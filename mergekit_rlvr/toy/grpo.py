"""Stage 3: policy-gradient training with a verifiable reward on task R (skill),
GRPO-style: for each prompt a group of sampled answers, reward 1 for the exact
``\\boxed{sum}`` and 0 otherwise, advantage = (r - group mean) / (group std + eps),
no critic and no KL term. Every batch is sampled from the current policy and
used for one update, so the PPO ratio is 1 and its clipping never acts; the loss
is the token-mean of -advantage * log-probability (Dr. GRPO / DAPO style).

The toy family uses plain SGD here (``optimizer="sgd"``): the update then follows
the accumulated policy gradient, which is small and concentrated on few entries,
the structure the papers report for RLVR; Adam's per-entry normalization moves
every entry by about the learning rate and gives a dense update."""

from __future__ import annotations

import copy
import random
from typing import Callable, Optional

import torch

from mergekit_rlvr.toy.lm import Codec, completion_logprobs, sample
from mergekit_rlvr.toy.tasks import TrainStreams, is_correct

ADV_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(P*G,) rewards laid out prompt-major -> group-normalized advantages."""
    r = rewards.view(-1, group)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + ADV_EPS)
    return adv.view(-1)


def grpo(base_model, streams: TrainStreams, steps: int, prompts: int = 16, group: int = 8, lr: float = 3e-5,
         temperature: float = 1.0, max_new: int = 32, seed: int = 0, optimizer: str = "adam",
         progress: Optional[Callable[[int, float], None]] = None):
    """Returns (trained copy of ``base_model``, list of mean rewards per step)."""
    codec = Codec()
    model = copy.deepcopy(base_model)
    torch.manual_seed(seed)
    rng = random.Random(f"grpo-{seed}")
    gen = torch.Generator().manual_seed(seed)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    history = []
    for step in range(steps):
        examples = [streams.rl_prompt(rng) for _ in range(prompts)]
        prompt_ids = torch.tensor([codec.encode(e.prompt) for e in examples]).repeat_interleave(group, 0)
        model.eval()
        completion = sample(model, prompt_ids, max_new, temperature=temperature, generator=gen)
        texts = [codec.decode(row.tolist()) for row in completion]
        answers = [e.answer for e in examples for _ in range(group)]
        rewards = torch.tensor([float(is_correct(t, a)) for t, a in zip(texts, answers)])
        history.append(float(rewards.mean()))
        adv = group_advantages(rewards, group)
        if progress:
            progress(step, history[-1])
        if not bool(adv.abs().gt(0).any()):
            continue
        model.train()
        logp, mask = completion_logprobs(model, prompt_ids, completion)
        loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model, history
