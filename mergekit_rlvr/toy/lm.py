"""Small language-model helpers shared by the toy training stages: encoding with
the character tokenizer, the masked next-token loss, batched sampling from
equal-length prompts, and loading/saving Hugging Face checkpoints."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mergekit_rlvr.toy.tiny import char_tokenizer, save_checkpoint, tiny_config

PAD, EOS = 0, 2


class Codec:
    """Character <-> id with the same ids as :func:`char_tokenizer` (one token
    per character, no special tokens added)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer or char_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.ids = {k: v for k, v in vocab.items() if len(k) == 1}
        self.chars = {v: k for k, v in self.ids.items()}

    def encode(self, text: str) -> List[int]:
        return [self.ids[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            out.append(self.chars.get(i, ""))
        return "".join(out)


def set_threads(threads: int) -> None:
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def new_model(config, seed: int):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    return model.float()


def load_model(path: str):
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model


def save_model(model, path: str) -> str:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return save_checkpoint(state, model.config, char_tokenizer(), path)


def make_config(hidden: int, layers: int, intermediate: int):
    vocab = len(char_tokenizer())
    return tiny_config(vocab, hidden=hidden, layers=layers, intermediate=intermediate,
                       max_position_embeddings=128)


def pad_batch(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, loss_mask


def lm_loss(model, ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the tokens whose ``loss_mask`` is 1 (right padding,
    causal attention, so padding never affects the scored positions)."""
    logits = model(input_ids=ids[:, :-1]).logits
    target = ids[:, 1:]
    mask = loss_mask[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum() / mask.sum().clamp_min(1.0)


def encode_example(codec: Codec, prompt: str, completion: str, train_prompt: bool) -> Tuple[List[int], List[int]]:
    p = codec.encode(prompt)
    c = codec.encode(completion) + [EOS]
    mask = ([1] * len(p) if train_prompt else [0] * len(p)) + [1] * len(c)
    return p + c, mask


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    max_new: int,
    temperature: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Continue equal-length prompts (B, L); greedy when ``temperature == 0``.
    Returns the (B, max_new) new tokens; after EOS every token is PAD."""
    batch = prompt_ids.shape[0]
    out = torch.full((batch, max_new), PAD, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    result = model(input_ids=prompt_ids, use_cache=True)
    past, logits = result.past_key_values, result.logits[:, -1]
    for t in range(max_new):
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, torch.full_like(token, PAD), token)
        out[:, t] = token
        done |= token == EOS
        if bool(done.all()):
            break
        result = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
        past, logits = result.past_key_values, result.logits[:, -1]
    return out


def completion_logprobs(model, prompt_ids: torch.Tensor, completion: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of ``completion`` (B, T) after equal-length
    prompts, and the mask of real tokens (up to and including EOS)."""
    ids = torch.cat([prompt_ids, completion], dim=1)
    logits = model(input_ids=ids[:, :-1]).logits[:, prompt_ids.shape[1] - 1:]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, completion[:, :, None]).squeeze(-1)
    is_eos = completion == EOS
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after_eos).float()
    return logp, mask


def greedy_texts(model, codec: Codec, prompts: Sequence[str], max_new: int = 40, batch: int = 256) -> List[str]:
    """Greedy completions with the HF model, grouped by prompt length."""
    model.eval()
    out: List[Optional[str]] = [None] * len(prompts)
    by_len: Dict[int, List[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for _, idx in sorted(by_len.items()):
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            ids = torch.tensor([codec.encode(prompts[i]) for i in chunk])
            new = sample(model, ids, max_new, temperature=0)
            for i, row in zip(chunk, new):
                out[i] = codec.decode(row.tolist())
    return out  # type: ignore[return-value]


def state_dict_copy(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(os.path.join(path, "config.json"))
