"""Tiny random-weight configs for *any* causal-LM model type the installed transformers registers.

Used by ``benchmarks/zoo.py`` (the census) and ``tests/test_zoo.py``. Never for quality claims.

``tiny_config(name)`` starts from ``AutoConfig.for_model(name)`` and shrinks every size it recognises by
its key (width 64, 2 layers, 4 heads / 2 KV heads, FFN 128, vocabulary 128, 256 positions, head_dim 16,
4 experts / top-2, ...), rebuilding the config through its own constructor so that derived sizes are
recomputed and its validators run. Per-layer lists (``layer_types``, ``layers_block_type``, index lists
such as ``moe_layers``) keep one layer of every distinct kind, so a hybrid model still has all its
block kinds. Composite (multimodal) configs are replaced by their text config when
``AutoModelForCausalLM`` accepts it. ``OVERRIDES`` holds the few per-type keys a generic shrink cannot
guess; this is the only place that names model types (the library never does).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

WIDTH, LAYERS, HEADS, KV_HEADS, FFN, VOCAB, POSITIONS, HEAD_DIM = 64, 2, 4, 2, 128, 128, 256, 16
MAX_PARAMETERS = 5_000_000
"""A "tiny" model has fewer parameters than this; more means the shrink missed a size."""

# Key -> value for every integer size the shrink recognises (only keys the config already has are set).
SIZES: dict[str, int] = {
    **dict.fromkeys(["hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "embedding_dim", "emb_dim",
                     "word_embed_proj_dim", "embedding_size", "input_embedding_size", "output_embedding_size",
                     "lru_width", "router_hidden_size", "backbone_hidden_size", "dim_model_base", "hidden_size_global",
                     "adapter_in_dim", "adapter_input_size", "adapter_out_dim"], WIDTH),
    **dict.fromkeys(["num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_blocks", "decoder_layers",
                     "encoder_layers", "num_decoder_layers", "num_encoder_layers"], LAYERS),
    **dict.fromkeys(["num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
                     "attention_heads", "swa_num_attention_heads"], HEADS),
    **dict.fromkeys(["intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim", "d_ff", "dff",
                     "dim_ff", "ffn_hidden_size", "feed_forward_size", "intermediate_size_mlp", "d_inner",
                     "dense_intermediate_size", "expert_ffn_hidden_size"], FFN),
    **dict.fromkeys(["moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
                     "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size"], 32),
    **dict.fromkeys(["vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input", "pronunciation_vocab_size",
                     "shape_vocab_size", "unpadded_vocab_size", "encoder_hash_byte_group_vocab"], VOCAB),
    **dict.fromkeys(["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "max_target_positions", "max_source_positions", "seq_length", "model_max_length"], POSITIONS),
    **dict.fromkeys(["head_dim", "kv_channels", "attention_head_dim", "attention_head_size", "d_kv", "d_head",
                     "dim_head", "swa_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim",
                     "v_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim", "index_head_dim"], HEAD_DIM),
    **dict.fromkeys(["q_lora_rank", "kv_lora_rank", "o_lora_rank", "laurel_rank", "adapter_rank", "loop_gate_rank",
                     "gated_norm_rank", "hc_lowrank"], 16),
    **dict.fromkeys(["qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim"], 8),
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k", "index_n_heads"], 2),
    **dict.fromkeys(["n_group", "topk_group", "num_expert_group", "mamba_n_groups", "n_groups", "mamba_ngroups"], 1),
    **dict.fromkeys(["linear_num_key_heads", "swa_num_key_value_heads"], KV_HEADS),
    **dict.fromkeys(["linear_num_value_heads", "linear_num_heads"], HEADS),
    **dict.fromkeys(["mamba_d_state", "ssm_state_size", "state_size", "d_state"], 16),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads", "n_mamba_heads"], 8),
    **dict.fromkeys(["mamba_dt_rank", "time_step_rank"], 8),
    **dict.fromkeys(["mamba_chunk_size", "chunk_size"], 16),
    "mamba_d_ssm": 128,
    "hidden_size_per_layer_input": 16,
    "ple_embed_dim": 16,
    "index_topk": 8,
    "zero_expert_num": 2,
}
KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_query_groups", "multi_query_group_num")
SPECIAL = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_eos_token_id",
           "forced_bos_token_id", "sep_token_id", "cls_token_id", "eod_token_id", "unk_token_id", "mask_token_id")
DERIVED = ("qk_head_dim",)
"""Keys a constructor computes from others: never passed back."""

ROPE = {"rope_type": "default", "rope_theta": 10000.0}
OVERRIDES: dict[str, dict[str, Any]] = {
    # Periodic layer patterns a per-layer list does not express.
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    # Default configs that do not build a model at all (a size left None, a key the model reads but the
    # config lacks, a validator the defaults fail).
    "cohere_compass_text": {"rope_parameters": {"full_attention": ROPE}},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "num_experts_per_tok": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # (An assistant shares every layer's KV cache with its target model, so it still cannot run alone.)
    "gemma4_assistant": {"__init__": {"text_config": {"hidden_size_per_layer_input": 0, "enable_moe_block": False,
                                                      "use_double_wide_mlp": False, "vocab_size_per_layer_input": 0}}},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    "reformer": {"axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 16]},
    "blt": {"num_hidden_layers": LAYERS},  # its cache reads the top config's layer count, which it lacks
    # Sizes that must agree in ways the generic shrink does not know.
    "mamba2": {"num_heads": 8},
    "kolibri1_1": {"index_num_heads": 1},  # an indexer scores with the query heads of key head 0
    "dory": {"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2, "n_input_layers": 1,
             "n_output_layers": 1, "n_recurrent_layers": 2},
    # Layer kinds that only work in company: shared KV needs producing layers of each kind; a shared block
    # needs two users.
    "gemma3n_text": {"__layers__": [3, 4, 33, 34], "num_kv_shared_layers": 2},
    "zamba": {"__layers__": [0, 2, 7]},
    # Hybrids whose default layer pattern has no attention layer in the first layers (or none at all).
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"num_hidden_layers": 3},
    # The native xLSTM kernel needs query/key heads as wide as value heads.
    "xlstm": {"qk_dim_factor": 1.0},
    # Inputs the model needs besides input_ids.
    "xmod": {"default_language": "en_XX"},
    "musicgen": {"decoder": {"num_codebooks": 1}},
    "musicgen_melody": {"decoder": {"num_codebooks": 1}},
    "dbrx": {"attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0}},
}
OVERRIDES["qwen4_exp"] = {"text_config": OVERRIDES["qwen4_exp_text"]}
OVERRIDES["gemma3n"] = {"text_config": OVERRIDES["gemma3n_text"]}
"""Per-type keys the generic shrink cannot guess (applied last; ``__layers__`` picks the layers kept)."""

_DEFAULT_ID = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}


def _is_layer_count(key: str) -> bool:
    return key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_blocks", "decoder_layers")


def _layer_selection(d: dict, layers: int) -> list[int] | None:
    """Original layer indices to keep: the first layer of every distinct kind, padded to ``LAYERS``."""
    per_layer = [v for k, v in d.items()
                 if isinstance(v, (list, tuple)) and len(v) == layers and not k.startswith("_")]
    index_lists = [v for k, v in d.items() if _is_index_list(k, v, layers)]
    if not per_layer and not index_lists:
        return None
    signatures, keep = set(), []
    for i in range(layers):
        signature = (tuple(repr(v[i]) for v in per_layer), tuple(i in v for v in index_lists))
        if signature not in signatures:
            signatures.add(signature)
            keep.append(i)
    keep = keep[:4]
    i = 0
    while len(keep) < min(LAYERS, layers):
        if i not in keep:
            keep.append(i)
        i += 1
    return sorted(keep)


def _is_index_list(key: str, value: Any, layers: int) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0 and all(type(x) is int for x in value)
            and all(0 <= x < layers for x in value) and list(value) == sorted(set(value))
            and any(key.endswith(s) for s in ("_layers", "_idxs", "_ids", "_indices", "_layer_ids")))


def _shrink(d: dict, changes: dict, override: dict | None = None) -> dict:
    """The keys of config dict ``d`` to change, as a (nested) dict of constructor keywords."""
    override = override or {}
    heads = next((d[k] for k in ("num_attention_heads", "n_head", "num_heads") if type(d.get(k)) is int), None)
    for key, value in d.items():
        if value is None and key == "head_dim" and heads is not None:
            changes[key] = HEAD_DIM  # some defaults leave it to a checkpoint
        elif value is None and key in KV_KEYS and heads is not None:
            changes[key] = KV_HEADS
        if key in SIZES and type(value) is int and value > 0:
            new = SIZES[key]
            if key in ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"):
                new = min(new, value)
            if value != new:
                changes[key] = new
        elif key in SIZES and isinstance(value, list) and value and all(type(x) is int for x in value):
            changes[key] = [SIZES[key]] * len(value)  # per-layer sizes, truncated below
        elif key in KV_KEYS and type(value) is int and value > 0:
            changes[key] = KV_HEADS if heads is None or value < heads else HEADS
        elif isinstance(value, dict) and "model_type" in value:  # a sub-config
            sub = _shrink(value, {}, override.get(key) if isinstance(override.get(key), dict) else None)
            if sub:
                changes[key] = sub
    # Per-layer lists: keep one layer of every kind.
    count_key = next((k for k in d if _is_layer_count(k) and type(d[k]) is int), None)
    if count_key is not None:
        layers = d[count_key]
        keep = override.get("__layers__") or _layer_selection(d, layers)
        if keep is not None:
            changes[count_key] = len(keep)
            for key, value in d.items():
                value = changes.get(key, value)
                if key.startswith("_"):
                    continue
                if isinstance(value, (list, tuple)) and len(value) == layers:
                    changes[key] = [value[i] for i in keep]
                elif _is_index_list(key, d[key], layers):
                    changes[key] = [j for j, i in enumerate(keep) if i in d[key]]
                elif (isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
                      and all(isinstance(v, dict) for v in value.values())):
                    # per-layer settings keyed by layer index: renumber the kept ones, shrink their sizes
                    width = len(str(next(iter(value))))
                    changes[key] = {f"{j:0{width}d}": {**value[k], **_shrink(value[k], {})}
                                    for j, i in enumerate(keep) for k in value if int(k) == i}
            for key in ("first_k_dense_replace", "num_dense_layers"):
                if type(d.get(key)) is int and d[key] >= len(keep):
                    changes[key] = 1
    vocab = changes.get("vocab_size", d.get("vocab_size"))
    if type(vocab) is int:
        for key in list(d):
            if key in SPECIAL or key.endswith(("_token_id", "_token_index")):
                value = d[key]
                if type(value) is int and value >= vocab:
                    changes[key] = _DEFAULT_ID.get(key, vocab - 1)
                elif isinstance(value, list) and any(type(x) is int and x >= vocab for x in value):
                    changes[key] = sorted({x if x < vocab else 2 for x in value})
    hidden = d.get("hidden_size")
    if type(d.get("attention_hidden_size")) is int and type(hidden) is int and d["attention_hidden_size"] % hidden == 0:
        # an attention width that is a multiple of the stream width (e.g. the concatenated input of a
        # shared block) keeps the multiple, and its heads keep their share of it
        attention = WIDTH * (d["attention_hidden_size"] // hidden)
        changes["attention_hidden_size"] = attention
        for key in ("attention_head_dim", "head_dim"):
            if type(d.get(key)) is int and heads and d[key] * heads == d["attention_hidden_size"]:
                changes[key] = attention // HEADS
    experts = any(type(d.get(k)) is int for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    for key in ("num_experts_per_tok", "n_group", "topk_group"):
        if experts and key in d and d[key] is None:  # left to a checkpoint; the router needs them
            changes[key] = SIZES[key]
    if "qk_rope_head_dim" in changes and d.get("head_dim") == d.get("qk_rope_head_dim"):
        changes["head_dim"] = changes["qk_rope_head_dim"]  # head_dim names the rotary part of MLA heads
    for key in DERIVED:
        changes.pop(key, None)
    for key, value in override.items():
        if key not in ("__layers__", "__init__") and not (isinstance(value, dict) and isinstance(changes.get(key), dict)
                                        and "model_type" in (d.get(key) or {})):
            changes[key] = value
    return changes


def causal_lm_class(config):
    """The class ``AutoModelForCausalLM`` builds for ``config`` (or None)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping.get(type(config), None)


def registered_class(name: str):
    """The causal-LM class transformers registers for model type ``name``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name])


def build(config, name: str | None = None):
    """The causal LM ``config`` describes: ``AutoModelForCausalLM``'s class, or the registered class of ``name``
    when the config is a sub-config that Auto does not map (e.g. a decoder config)."""
    cls = causal_lm_class(config) or registered_class(name or getattr(config, "zoo_type", config.model_type))
    return cls._from_config(config)


def tiny_config(name: str):
    """A tiny config of model type ``name``; raises when none can be built.

    ``config.zoo_note`` says what was done beyond the generic shrink (e.g. the text config was taken).
    """
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = OVERRIDES.get(name, {}).get("__init__", {})  # for defaults that fail their own validation
        d = AutoConfig.for_model(name, **first).to_dict()
        changes = _shrink(d, {}, OVERRIDES.get(name))
        for key, value in first.items():
            changes[key] = {**changes.get(key, {}), **value} if isinstance(value, dict) else value
        if d.get("is_decoder") is False:
            changes["is_decoder"] = True
        config = AutoConfig.for_model(name, **changes)
        note = ""
        own = registered_class(name).config_class
        if not isinstance(config, own):  # the registered class reads a sub-config (e.g. musicgen's decoder)
            subs = [getattr(config, k) for k in getattr(config, "sub_configs", {})]
            sub = next((c for c in subs if isinstance(c, own)), None)
            if sub is not None:
                config, note = sub, f"sub-config {sub.model_type}"
        try:
            text = config.get_text_config(decoder=True)
        except ValueError:  # several candidates
            text = config
        if type(text) is not type(config) and causal_lm_class(text) is not None:
            config, note = text, f"text config {text.model_type}"
        config.zoo_note, config.zoo_type = note, name
    return config


def count_parameters(config) -> int:
    """Parameters of the model ``config`` builds, counted on the meta device (nothing allocated)."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = build(config)
    return sum(p.numel() for p in model.parameters())


def tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, config=None):
    """A randomly initialised tiny model whose norms carry non-trivial weights and biases."""
    config = config if config is not None else tiny_config(name)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(config, name).eval().to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                for p in module.parameters(recurse=False):
                    if p.is_floating_point():
                        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.2)
    return model
