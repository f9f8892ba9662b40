"""Write a Llama-architecture Hugging Face checkpoint with random weights, one safetensors shard per
decoder layer, without ever holding more than one layer in memory (for streamed compression).

    python benchmarks/synthetic_checkpoint.py OUT --layers 24 --hidden 1536 --intermediate 4096

The weights are N(0, 0.02²) (norm scales 1), seeded per tensor, so a checkpoint is the same on every
machine; they compute nothing useful: the checkpoint measures memory and time, not quality.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file


def layer_shapes(config) -> dict[str, tuple[int, ...]]:
    d, f = config.hidden_size, config.intermediate_size
    head = config.head_dim
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    return {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
            "self_attn.o_proj.weight": (d, q), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f)}


def _tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * 0.02


def write_checkpoint(out: Path, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                     vocab: int, tie: bool = False) -> int:
    """Write the checkpoint; returns its weights' bytes."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         head_dim=hidden // heads, max_position_embeddings=2048, tie_word_embeddings=tie)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    shards = [{"model.embed_tokens.weight": (vocab, hidden)}]
    shards += [{f"model.layers.{i}.{k}": s for k, s in layer_shapes(config).items()} for i in range(layers)]
    shards.append({"model.norm.weight": (hidden,), **({} if tie else {"lm_head.weight": (vocab, hidden)})})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _tensor(name, shape) for name, shape in shard.items()}
        save_file(tensors, out / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tie", action="store_true")
    args = parser.parse_args()
    total = write_checkpoint(args.out, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads,
                             args.vocab, args.tie)
    print(f"wrote {args.out}: {total / 1e9:.2f} GB of float32 weights")


if __name__ == "__main__":
    main()
