"""Tiny randomly initialised HF models, one per supported family (for tests and examples)."""

from __future__ import annotations

import torch
import transformers as T

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "opt")


def tiny_config(family: str):
    if family == "llama":
        return T.LlamaConfig(**_COMMON)
    if family == "mistral":
        return T.MistralConfig(**_COMMON)
    if family == "qwen2":
        return T.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return T.Qwen3Config(**_COMMON, head_dim=16)
    if family == "gemma3_text":
        return T.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=32)
    if family == "phi3":
        return T.Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return T.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 64-wide random CausalLM of ``family`` in fp32 eval mode."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(tiny_config(family))
    return model.float().eval()
