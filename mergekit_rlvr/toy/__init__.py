"""Toy models that run on a laptop CPU: a character-level tokenizer, a tiny
Qwen2-shaped decoder, and generated families (base plus fine-tuned variants).

- ``tiny``: random tiny checkpoints in seconds (tests, benches).
- ``tasks``: task K (a secret lexicon, knowledge), task R (carrying in addition,
  skill), held-out eval sets and the unlabeled query pool.
- ``pretrain``, ``sft``, ``grpo``: the three training stages; ``lm``: shared helpers.
- ``family``: ``build_family(out, FamilySettings())`` trains or reuses base/sft/rl.
- ``evaluate``: greedy accuracy of a directory, a ``vllm.LLM`` or a ``HotSwapLLM``.
- ``probe``: oracle grid of DoTS merges through ``mergekit-yaml`` (labels used).
"""
