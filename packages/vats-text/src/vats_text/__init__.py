"""vats-text: tokenizer, MoE language model, generation, text encoder, HF import."""
