"""Tiny random-weight Hugging Face causal LMs built from configs (no downloads), for invariance tests
and benchmarks/coverage.py. Never for quality claims."""

from __future__ import annotations

import warnings

import torch

LISTED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "opt", "gpt2", "gpt_neox", "granite", "stablelm"]
"""The architectures the core issue names."""

EXTRA = ["gemma2", "gemma3_text", "phi3", "olmo", "olmo2", "cohere", "falcon", "bloom", "gptj", "codegen",
         "starcoder2", "nemotron", "gpt_bigcode", "helium", "smollm3", "glm", "persimmon", "mixtral", "olmoe"]
"""Further architectures nobody wrote anything for: the same public calls are run on them."""

SIZES = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,  # hidden / heads: some configs default to 128, which makes attention 8x the MLPs
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 256,
}
OVERRIDES = {
    "gpt2": {"num_key_value_heads": None},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gptj": {"rotary_dim": 8},
    "falcon": {"ffn_hidden_size": 128},  # the config's default is falcon-7b's 18176
    "codegen": {"rotary_dim": 8, "n_ctx": 256},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
}


def tiny_config(name: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(name)
    for key, value in {**SIZES, **OVERRIDES.get(name, {})}.items():
        derived = isinstance(getattr(type(config), key, None), property)  # e.g. falcon's head_dim
        if value is not None and not derived and (hasattr(config, key) or key in OVERRIDES.get(name, {})):
            setattr(config, key, value)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
            setattr(config, key, 0)
    return config


FLOAT32_ONLY = {"mixtral", "olmoe"}
"""Mixture-of-experts kernels (grouped matmul) accept no float64 on CPU."""


def tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised tiny model whose norms carry non-trivial weights and biases."""
    if name in FLOAT32_ONLY:
        dtype = torch.float32
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(name)).eval().to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for p in module.parameters(recurse=False):
                    p.add_(torch.randn_like(p) * 0.2)
    return model
