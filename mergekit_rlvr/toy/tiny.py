"""Tiny Qwen2-shaped checkpoints with a character-level tokenizer.

Loadable by mergekit and by vLLM's CPU backend (head_dim 64). ``write_family``
writes a base and variants whose task vectors look like the papers' (a large dense
"sft" update, a small sparse "rl" update), in seconds, for tests and benches.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from typing import Dict, Optional, Sequence

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")


def tiny_config(vocab_size: int, hidden: int = 128, layers: int = 2, intermediate: int = 256, **overrides):
    from transformers import Qwen2Config

    heads = max(1, hidden // 64)
    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="float32",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_theta=10000.0,
        architectures=["Qwen2ForCausalLM"],
    )
    values.update(overrides)
    return Qwen2Config(**values)


def char_tokenizer():
    """A PreTrainedTokenizerFast that maps every character to one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return fast


def atomic_dir(final: str):
    """A temporary sibling directory to fill and then rename onto ``final``."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    return tmp


def save_checkpoint(state: Dict[str, torch.Tensor], config, tokenizer, path: str, dtype=torch.float32) -> str:
    """config.json + tokenizer + model.safetensors, written atomically."""
    from safetensors.torch import save_file

    tmp = atomic_dir(path)
    try:
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = str(dtype).replace("torch.", "")
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def random_state(config, seed: int) -> Dict[str, torch.Tensor]:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(state: Dict[str, torch.Tensor], scale: float, density: float, seed: int) -> Dict[str, torch.Tensor]:
    """base + a random update of relative size ``scale`` on a ``density`` share of entries."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in state.items():
        noise = torch.randn(value.shape, generator=g) * scale * (value.float().std() + 1e-3)
        if density < 1.0:
            noise = noise * (torch.rand(value.shape, generator=g) < density)
        out[name] = value + noise.to(value.dtype)
    return out


DEFAULT_VARIANTS = {"sft": (0.3, 1.0), "rl": (0.01, 0.3)}


def write_family(
    out: str,
    variants: Optional[Dict[str, Sequence[float]]] = None,
    seed: int = 0,
    dtype=torch.float32,
    **config_overrides,
) -> Dict[str, str]:
    """Write ``base`` and one checkpoint per variant (name -> (scale, density)).
    Returns name -> path."""
    variants = DEFAULT_VARIANTS if variants is None else variants
    tokenizer = char_tokenizer()
    config = tiny_config(len(tokenizer), **config_overrides)
    base = random_state(config, seed)
    paths = {"base": save_checkpoint(base, config, tokenizer, os.path.join(out, "base"), dtype)}
    for i, (name, (scale, density)) in enumerate(variants.items()):
        state = perturb(base, scale, density, seed + 1 + i)
        paths[name] = save_checkpoint(state, config, tokenizer, os.path.join(out, name), dtype)
    with open(os.path.join(out, "family.json"), "w") as f:
        json.dump({"seed": seed, "variants": {k: list(v) for k, v in variants.items()}}, f)
    return paths
