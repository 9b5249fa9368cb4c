"""Stage 1: pretrain the toy base on a synthetic corpus covering both task formats
(next-token loss on whole documents, AdamW with warm-up and cosine decay)."""

from __future__ import annotations

import math
import random
from typing import Callable, Optional

import torch

from mergekit_rlvr.toy.lm import Codec, encode_example, lm_loss, new_model, pad_batch
from mergekit_rlvr.toy.tasks import TrainStreams


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(config, streams: TrainStreams, steps: int, batch: int = 64, lr: float = 3e-3, seed: int = 0,
             progress: Optional[Callable[[int, float], None]] = None):
    """Returns the trained model (float32, train mode off)."""
    codec = Codec()
    model = new_model(config, seed)
    model.train()
    rng = random.Random(f"pretrain-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def rows():
        return [encode_example(codec, streams.pretrain_doc(rng), "", True) for _ in range(batch)]

    return train(model, opt, steps, lr, max(1, steps // 20), rows, progress)


def train(model, opt, steps: int, lr: float, warmup: int, rows: Callable[[], list],
          progress: Optional[Callable[[int, float], None]] = None):
    """``steps`` optimizer steps on the masked next-token loss (``lm_loss``) of
    ``rows()`` (one batch of ``encode_example`` pairs per call), the learning rate
    warmed up then cosine-decayed, gradients clipped to norm 1. Returns ``model``
    (train mode off)."""
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        ids, mask = pad_batch(*zip(*rows()))
        loss = lm_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress:
            progress(step, float(loss.detach()))
    model.eval()
    return model
