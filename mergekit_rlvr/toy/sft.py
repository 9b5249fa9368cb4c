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

from mergekit_rlvr.toy.lm import Codec, encode_example
from mergekit_rlvr.toy.pretrain import train
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

    def rows():
        out = []
        for _ in range(batch):
            if rng.random() < replay:
                out.append(encode_example(codec, streams.pretrain_doc(rng), "", True))
            else:
                e = streams.sft_example(rng)
                out.append(encode_example(codec, e.prompt, e.completion, False))
        return out

    return train(model, opt, steps, lr, max(1, steps // 10), rows, progress)
