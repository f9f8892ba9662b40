"""Whole small decoder-only architectures for property tests, drawn by hypothesis.

``TinyLM`` is written here the way people write transformers (not the way fxslice matches them): its
norms compute in the input dtype, attention uses grouped KV heads through ``scaled_dot_product_attention``
and the variants are the ones the passes must handle — LayerNorm, RMSNorm and offset ``(1 + w)`` RMSNorm,
biases on or off, sequential or parallel blocks, tied or untied head, learned positional embeddings,
scaled embeddings, a norm on the embeddings and post-norms written into the stream (sandwich norms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


@dataclass(frozen=True)
class Arch:
    vocab: int = 37
    width: int = 16
    depth: int = 2
    heads: int = 2
    kv_heads: int = 1
    mlp: int = 24
    norm: str = "rms"  # "layer" | "rms" | "rms_offset"
    root: str = "rsqrt"  # how an RMS norm writes 1/√(mean x² + eps): "rsqrt" | "pow" | "div_sqrt" | "div_pow"
    bias: bool = False
    parallel: bool = False
    tied: bool = False
    learned_pos: bool = False
    post_norms: bool = False
    gated: bool = True
    fused: str = ""  # gated MLPs: "chunk" or "split" puts gate and up in one linear that the graph splits
    embed_scale: bool = False
    embed_norm: bool = False  # a norm applied to the embeddings, written into the stream
    head_transform: bool = False  # BERT-style head: final norm, dense, gelu, a norm of its own, then the head


class Norm(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.kind, self.root = arch.norm, arch.root
        self.weight = nn.Parameter(torch.ones(arch.width))
        self.bias = nn.Parameter(torch.zeros(arch.width)) if arch.norm == "layer" and arch.bias else None

    def forward(self, x):
        if self.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)
        shifted = x.pow(2).mean(-1, keepdim=True) + 1e-6
        y = {"rsqrt": lambda: x * torch.rsqrt(shifted), "pow": lambda: x * torch.pow(shifted, -0.5),
             "div_sqrt": lambda: x / torch.sqrt(shifted), "div_pow": lambda: x / shifted ** 0.5}[self.root]()
        return y * (1.0 + self.weight) if self.kind == "rms_offset" else y * self.weight


class Attention(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.heads, self.kv_heads = arch.heads, arch.kv_heads
        self.head_dim = arch.width // arch.heads
        kv = self.kv_heads * self.head_dim
        self.q = nn.Linear(arch.width, arch.width, bias=arch.bias)
        self.k = nn.Linear(arch.width, kv, bias=arch.bias)
        self.v = nn.Linear(arch.width, kv, bias=arch.bias)
        self.o = nn.Linear(arch.width, arch.width, bias=arch.bias)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.gated, self.fused, self.width = arch.gated, arch.fused if arch.gated else "", arch.mlp
        if self.fused:
            self.gate_up = nn.Linear(arch.width, 2 * arch.mlp, bias=arch.bias)
        else:
            self.up = nn.Linear(arch.width, arch.mlp, bias=arch.bias)
            self.gate = nn.Linear(arch.width, arch.mlp, bias=arch.bias) if arch.gated else None
        self.down = nn.Linear(arch.mlp, arch.width, bias=arch.bias)

    def forward(self, x):
        if self.fused:
            both = self.gate_up(x)
            gate, up = both.chunk(2, -1) if self.fused == "chunk" else both.split(self.width, -1)
            return self.down(F.silu(gate) * up)
        h = F.silu(self.gate(x)) * self.up(x) if self.gated else F.gelu(self.up(x))
        return self.down(h)


class GroupedExperts(nn.Module):
    """A mixture-of-experts MLP: top-1 experts held as 3-D weights, gate and up fused, applied by grouped
    matmuls over the rows sorted by expert (as Hugging Face's MoE layers do); expert ``e``'s channels
    ``dead[e]`` are always 0."""

    def __init__(self, width=6, inner=8, dead=((0, 1), (2, 3), (4, 5))):
        super().__init__()
        from transformers.integrations import moe  # registers torch.ops.transformers.grouped_mm_fallback

        self.grouped = moe.torch.ops.transformers.grouped_mm_fallback
        experts = len(dead)
        generator = torch.Generator().manual_seed(0)
        self.router = nn.Linear(width, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * inner, width, generator=generator) / width**0.5)
        self.down = nn.Parameter(torch.randn(experts, width, inner, generator=generator) / inner**0.5)
        with torch.no_grad():
            for e, channels in enumerate(dead):
                self.gate_up[e, list(channels)] = 0.0  # silu(0) · up = 0

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        expert = self.router(rows).argmax(-1)
        order = expert.argsort(stable=True)
        offsets = F.one_hot(expert, self.down.shape[0]).sum(0).cumsum(0).to(torch.int32)
        gate, up = self.grouped(rows[order], self.gate_up.transpose(-2, -1), offsets).chunk(2, -1)
        y = self.grouped(F.silu(gate) * up, self.down.transpose(-2, -1), offsets)
        return y[order.argsort()].reshape(x.shape)


class Block(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.norm1, self.norm2 = Norm(arch), Norm(arch)
        self.attn, self.mlp = Attention(arch), MLP(arch)
        if arch.post_norms:
            self.post1, self.post2 = Norm(arch), Norm(arch)

    def forward(self, x):
        a, m = self.attn, self.mlp
        post1 = self.post1 if self.arch.post_norms else (lambda y: y)
        post2 = self.post2 if self.arch.post_norms else (lambda y: y)
        if self.arch.parallel:
            return x + post1(a(self.norm1(x))) + post2(m(self.norm2(x)))
        x = x + post1(a(self.norm1(x)))
        return x + post2(m(self.norm2(x)))


class TinyLM(nn.Module):
    def __init__(self, arch: Arch, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab, arch.width)
        self.pos = nn.Embedding(64, arch.width) if arch.learned_pos else None
        self.embed_norm = Norm(arch) if arch.embed_norm else None
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.final_norm = Norm(arch)
        self.head = nn.Linear(arch.width, arch.vocab, bias=False)
        if arch.head_transform:
            self.head_dense, self.head_norm = nn.Linear(arch.width, arch.width), Norm(arch)
        if arch.tied:
            self.head.weight = self.embed.weight
        with torch.no_grad():  # norms with non-trivial affine parameters, so folding them is tested
            for module in self.modules():
                if isinstance(module, Norm):
                    module.weight.copy_(torch.randn_like(module.weight) * 0.3 + (0.0 if arch.norm == "rms_offset" else 1.0))
                    if module.bias is not None:
                        module.bias.normal_(0, 0.2)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if self.arch.embed_scale:
            x = x * (self.arch.width ** 0.5)
        if self.pos is not None:
            x = x + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.arch.head_transform:  # off the stream: the tied head reads a value no stream carries
            x = self.head_norm(nn.functional.gelu(self.head_dense(x)))
        return self.head(x)


@st.composite
def architectures(draw) -> Arch:
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    return Arch(
        vocab=draw(st.integers(5, 40)),
        width=heads * head_dim,
        depth=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),
        mlp=draw(st.sampled_from([8, 24, 40])),
        norm=draw(st.sampled_from(["layer", "rms", "rms_offset"])),
        root=draw(st.sampled_from(["rsqrt", "pow", "div_sqrt", "div_pow"])),
        bias=draw(st.booleans()),
        parallel=draw(st.booleans()),
        tied=draw(st.booleans()),
        learned_pos=draw(st.booleans()),
        post_norms=draw(st.booleans()),
        gated=draw(st.booleans()),
        fused=draw(st.sampled_from(["", "chunk", "split"])),
        embed_scale=draw(st.booleans()),
        embed_norm=draw(st.booleans()),
        head_transform=draw(st.booleans()),
    )


def example_ids(arch: Arch, batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, arch.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
