"""shrink_values: value heads narrowed per key/value group, the output projection's rows following."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given

import fxslice
from conftest import relative_error
from fxslice import UnsupportedGraphError, shrink_values
from fxslice.analysis.attention import find_value_paths
from fxslice.passes.shrink_values import ShrinkValues, value_transform
from strategies import TinyLM, architectures, example_ids

GROUPS, HEADS, HEAD_DIM, RANK = 2, 4, 16, 8


def grouped_llama(dtype=torch.float64, bias=False, seed=0):
    """A tiny Llama with two query heads per key/value group (or Qwen2, whose projections have biases)."""
    import transformers

    kind = (transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if bias else \
        (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    config = kind[0](vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HEAD_DIM,
                     max_position_embeddings=128)
    torch.manual_seed(seed)
    return kind[1](config).to(dtype).eval()


def low_rank_values(model):
    """Each group's values confined to RANK of its HEAD_DIM channels' directions: narrowing to RANK loses nothing."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.self_attn.v_proj.weight  # [groups · head_dim, hidden]
            for g in range(GROUPS):
                rows = slice(g * HEAD_DIM, (g + 1) * HEAD_DIM)
                basis = torch.randn(HEAD_DIM, RANK, generator=generator, dtype=weight.dtype)
                weight[rows] = basis @ torch.randn(RANK, weight.shape[1], generator=generator, dtype=weight.dtype) / 8
    return model


def calibration(n=3):
    return [{"input_ids": torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(i))} for i in range(n)]


def compress(model, passes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslice.compile(model, passes, calibration=calibration())


def test_the_transform_at_full_width_is_the_identity():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, HEAD_DIM, generator=generator, dtype=torch.float64)
    o = torch.randn(HEAD_DIM, 3 * 64, generator=generator, dtype=torch.float64)
    m, m_plus = value_transform(x.T @ x, o, HEAD_DIM, ridge=1e-2)
    assert torch.allclose(m @ m_plus, torch.eye(HEAD_DIM, dtype=torch.float64), atol=1e-10)


def test_the_analysis_finds_every_group_and_the_heads_that_read_it():
    gm = fxslice.capture(grouped_llama())
    paths, skipped = find_value_paths(gm)
    assert not skipped and len(paths) == 2
    # repeat_kv puts each group's copies side by side: heads 0, 1 read group 0
    assert {(p.width, p.groups, p.heads, p.group_of_head) for p in paths} == {(HEAD_DIM, GROUPS, HEADS, (0, 0, 1, 1))}


def test_values_of_lower_rank_narrow_exactly_and_the_width_follows_everywhere(tmp_path):
    from transformers import GenerationConfig

    model = low_rank_values(grouped_llama())
    narrowed = compress(model, [shrink_values(0.5)])
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(5))
    assert relative_error(narrowed(ids).logits, model(ids).logits) < 1e-4  # the damping (1e-6 of the mean variance)
    shapes = {n.split(".self_attn.")[-1]: tuple(p.shape) for n, p in narrowed.named_parameters() if "_proj" in n}
    assert shapes["v_proj.weight"] == (GROUPS * RANK, 64) and shapes["o_proj.weight"] == (64, HEADS * RANK)
    assert fxslice.report(narrowed)["parameters"]["after"] < fxslice.report(narrowed)["parameters"]["before"]
    # The decoding graph's value cache narrows too: generate runs it (no fallback) and gives the argmax chain.
    narrowed.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = narrowed.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert not [w for w in caught if "KV-cache" in str(w.message)]
    (decoder,) = [d for d in narrowed.decoders.values() if d is not None]
    assert {tuple(b.shape)[-1] for name, b in decoder.named_buffers() if name.endswith("values")} == {RANK}
    assert torch.equal(out[:, 5:], narrowed(out).logits[:, 4:-1].argmax(-1))
    fxslice.save(narrowed, tmp_path / "m")
    assert torch.equal(fxslice.load(tmp_path / "m")(ids).logits, narrowed(ids).logits)
    with pytest.raises(UnsupportedGraphError, match="value heads"):
        fxslice.export(narrowed, tmp_path / "hf", format="hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_biases_move_with_the_values_and_zero_changes_nothing():
    model = grouped_llama(bias=True)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(compress(model, [shrink_values(0.0)])(ids).logits, compress(model, [])(ids).logits)
    narrowed = compress(model, [shrink_values(0.5)])
    biases = {tuple(p.shape) for n, p in narrowed.named_parameters() if n.endswith("v_proj.bias")}
    assert biases == {(GROUPS * RANK,)}
    # Random weights: the values have full rank and narrowing loses something; less than keeping the
    # first RANK channels of every head as they are.
    first = grouped_llama(bias=True)
    with torch.no_grad():
        for layer in first.model.layers:
            for g in range(GROUPS):
                layer.self_attn.v_proj.weight[g * HEAD_DIM + RANK:(g + 1) * HEAD_DIM] = 0
                layer.self_attn.v_proj.bias[g * HEAD_DIM + RANK:(g + 1) * HEAD_DIM] = 0
    chosen, kept_first = narrowed(ids).logits, first(ids).logits
    # (measured: 0.57 against 0.83)
    assert relative_error(chosen, model(ids).logits) < 0.8 * relative_error(kept_first, model(ids).logits)


def test_bad_ratios_are_refused():
    for ratio in (1.0, -0.1, True, "half"):
        with pytest.raises(ValueError, match="shrink_values ratio"):
            shrink_values(ratio)


@given(architectures())
def test_values_of_lower_rank_narrow_exactly_in_every_generated_architecture(arch):
    # Each group's values (bias included) confined to half its channels' directions: narrowing every value
    # head to half loses nothing, whatever the grouping of query heads (a wrong group would).
    model = TinyLM(arch).double().eval()
    head_dim = arch.width // arch.heads
    rank = head_dim // 2
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in model.blocks:
            for g in range(arch.kv_heads):
                rows = slice(g * head_dim, (g + 1) * head_dim)
                basis = torch.randn(head_dim, rank, generator=generator, dtype=torch.float64)
                block.attn.v.weight[rows] = basis @ torch.randn(rank, arch.width, generator=generator, dtype=torch.float64)
                if arch.bias:
                    block.attn.v.bias[rows] = basis @ torch.randn(rank, generator=generator, dtype=torch.float64)
    calibration = [(example_ids(arch, 4, 9, seed=s),) for s in (10, 11)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        narrowed = fxslice.compile(model, [ShrinkValues(ratio=0.5, multiple_of=1, progress=False)],
                                   calibration=calibration, example_inputs=(example_ids(arch),))
    details = fxslice.report(narrowed)["values"]
    assert not details["skipped"] and [k for _, _, k in details["values"]] == [rank] * arch.depth
    ids = example_ids(arch, 3, 5, seed=3)
    assert relative_error(narrowed(ids), model(ids)) < 1e-4  # the damping (1e-6 of the mean variance)
