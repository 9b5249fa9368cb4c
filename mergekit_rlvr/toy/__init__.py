"""Toy models that run on a laptop CPU: a character-level tokenizer, a tiny
Qwen2-shaped decoder, and generated families (base plus fine-tuned variants)."""
