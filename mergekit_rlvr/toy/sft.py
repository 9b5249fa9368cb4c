"""Stage 2: supervised fine-tuning of the base on task K (knowledge), loss on the
answer tokens only (``\\boxed{...}`` and EOS).

A share ``replay`` of every batch is general text from the pretraining corpus
(whole-document loss), as real SFT mixtures carry general data: without it the
tiny model forgets the arithmetic format entirely while it learns the table."""

from __future__ import annotations

import copy
import random
from typing import Callable, Optional

import torch

from mergekit_rlvr.toy.lm import Codec, encode_example, lm_loss, pad_batch
from mergekit_rlvr.toy.pretrain import cosine_lr
from mergekit_rlvr.toy.tasks import TrainStreams


def sft(base_model, streams: TrainStreams, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0,
        replay: float = 0.5,
        progress: Optional[Callable[[int, float], None]] = None):
    """Returns a fine-tuned copy of ``base_model`` (which is left unchanged)."""
    codec = Codec()
    model = copy.deepcopy(base_model)
    model.train()
    torch.manual_seed(seed)
    rng = random.Random(f"sft-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 10)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        rows = []
        for _ in range(batch):
            if rng.random() < replay:
                rows.append(encode_example(codec, streams.pretrain_doc(rng), "", True))
            else:
                e = streams.sft_example(rng)
                rows.append(encode_example(codec, e.prompt, e.completion, False))
        ids, mask = pad_batch(*zip(*rows))
        loss = lm_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress:
            progress(step, float(loss.detach()))
    model.eval()
    return model
