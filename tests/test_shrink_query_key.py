"""shrink_query_key: the same channels (rotary pairs) deleted from every query head of a group and its keys."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given

import fxslice
from conftest import relative_error
from fxslice import UnsupportedGraphError, shrink_query_key
from fxslice.analysis.attention import find_query_key_paths
from fxslice.passes.shrink_query_key import ShrinkQueryKey
from strategies import TinyLM, architectures, example_ids
from test_shrink_values import GROUPS, HEAD_DIM, HEADS, compress, grouped_llama

PAIRS = 4  # pairs (j, j + HEAD_DIM/2) that carry anything in dead_pairs' models


def dead_pairs(model):
    """Every query and key head's pairs j ≥ PAIRS zero: deleting them deletes nothing from any score."""
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                heads = projection.weight.view(-1, HEAD_DIM, projection.weight.shape[1])
                heads[:, PAIRS : HEAD_DIM // 2] = 0
                heads[:, HEAD_DIM // 2 + PAIRS :] = 0
    return model


def test_the_analysis_pairs_rotary_halves_and_maps_each_query_head_to_its_group():
    (path, other), skipped = find_query_key_paths(fxslice.capture(grouped_llama()))
    assert not skipped
    assert (path.width, path.groups, path.heads, path.group_of_head) == (HEAD_DIM, GROUPS, HEADS, (0, 0, 1, 1))
    assert path.units == tuple((j, j + HEAD_DIM // 2) for j in range(HEAD_DIM // 2)) and set(path.kinds) == {0}
    # cos and sin for the queries and for the keys; each table index reads its head's group
    assert sorted(t.group_along_heads for t in path.tables) == [(0, 0, 1, 1)] * 2 + [(0, 1)] * 2
    assert len(path.slices) == 4  # x[..., :d/2] and x[..., d/2:] of the queries and of the keys


def test_a_norm_over_each_heads_channels_is_skipped_with_the_reason():
    import transformers

    config = transformers.Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=GROUPS, head_dim=HEAD_DIM)
    model = transformers.Qwen3ForCausalLM(config).eval()
    paths, skipped = find_query_key_paths(fxslice.capture(model))
    assert not paths and len(skipped) == 2
    assert all("norm over each head's channels" in s.reason and "q_norm" in str(s) for s in skipped)
    narrowed = compress(model, [shrink_query_key(0.5)])
    assert len(fxslice.report(narrowed)["query_key"]["skipped"]) == 2
    assert fxslice.report(narrowed)["parameters"]["ratio"] == 1.0
    with pytest.raises(UnsupportedGraphError, match="q_norm"):
        compress(model, [ShrinkQueryKey(ratio=0.5, strict=True)])


def test_dead_pairs_are_deleted_exactly_and_the_width_follows_everywhere(tmp_path):
    from transformers import GenerationConfig

    model = dead_pairs(grouped_llama())
    narrowed = compress(model, [shrink_query_key(0.5)])
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(5))
    assert relative_error(narrowed(ids).logits, model(ids).logits) < 1e-12
    shapes = {n.split(".self_attn.")[-1]: tuple(p.shape) for n, p in narrowed.named_parameters() if "_proj" in n}
    assert shapes["q_proj.weight"] == (HEADS * 2 * PAIRS, 64) and shapes["k_proj.weight"] == (GROUPS * 2 * PAIRS, 64)
    details = fxslice.report(narrowed)["query_key"]
    assert [kept for _, _, kept in details["heads"]] == [2 * PAIRS] * 2
    # The decoding graph's key cache narrows too: generate runs it (no fallback) and gives the argmax chain.
    narrowed.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = narrowed.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert not [w for w in caught if "KV-cache" in str(w.message)]
    (decoder,) = [d for d in narrowed.decoders.values() if d is not None]
    assert {tuple(b.shape)[-1] for name, b in decoder.named_buffers() if name.endswith("keys")} == {2 * PAIRS}
    assert torch.equal(out[:, 5:], narrowed(out).logits[:, 4:-1].argmax(-1))
    fxslice.save(narrowed, tmp_path / "m")
    assert torch.equal(fxslice.load(tmp_path / "m")(ids).logits, narrowed(ids).logits)
    with pytest.raises(UnsupportedGraphError, match="query and key heads"):
        fxslice.export(narrowed, tmp_path / "hf", format="hf", progress=False)
    assert not (tmp_path / "hf").exists()


def uneven_pairs(model):
    """Each head's pairs scaled by factors spread over an order of magnitude (the same two models alike)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                for tensor in (projection.weight, projection.bias):
                    heads = tensor.view(-1, HEAD_DIM, *tensor.shape[1:])
                    scale = torch.randn(heads.shape[0], HEAD_DIM // 2, generator=generator, dtype=tensor.dtype)
                    heads *= scale.exp().repeat(1, 2).view(heads.shape[0], HEAD_DIM, *[1] * (heads.dim() - 2))
    return model


def test_the_chosen_pairs_lose_less_than_the_first_ones_and_zero_changes_nothing():
    model = uneven_pairs(grouped_llama(bias=True))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(compress(model, [shrink_query_key(0.0)])(ids).logits, compress(model, [])(ids).logits)
    narrowed = compress(model, [shrink_query_key(0.5)])
    assert {tuple(p.shape) for n, p in narrowed.named_parameters() if n.endswith("k_proj.bias")} == {(GROUPS * 8,)}
    # Keeping each head's first pairs instead:
    first = uneven_pairs(grouped_llama(bias=True))
    with torch.no_grad():
        for layer in first.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                for tensor in (projection.weight, projection.bias):
                    heads = tensor.view(-1, HEAD_DIM, *tensor.shape[1:])
                    heads[:, 4 : HEAD_DIM // 2] = 0
                    heads[:, HEAD_DIM // 2 + 4 :] = 0
    dense = model(ids).logits
    # (measured: 0.012 against 0.082)
    assert relative_error(narrowed(ids).logits, dense) < 0.5 * relative_error(first(ids).logits, dense)


def test_bad_ratios_are_refused():
    for ratio in (1.0, -0.1, True, "half"):
        with pytest.raises(ValueError, match="shrink_query_key ratio"):
            shrink_query_key(ratio)


@given(architectures())
def test_dead_channels_are_deleted_exactly_in_every_generated_architecture(arch):
    # Half of every query and key head's channels zero (biases too): deleting half loses nothing, whatever
    # the grouping of query heads (a wrong group would delete live channels) and with the softmax scale
    # of the original width (sdpa's default would change with the width).
    model = TinyLM(arch).double().eval()
    head_dim = arch.width // arch.heads
    with torch.no_grad():
        for block in model.blocks:
            for projection in (block.attn.q, block.attn.k):
                for tensor in (projection.weight, projection.bias):
                    if tensor is not None:
                        tensor.view(-1, head_dim, *tensor.shape[1:])[:, head_dim // 2 :] = 0
    calibration = [(example_ids(arch, 4, 9, seed=s),) for s in (10, 11)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        narrowed = fxslice.compile(model, [ShrinkQueryKey(ratio=0.5, multiple_of=1, progress=False)],
                                   calibration=calibration, example_inputs=(example_ids(arch),))
    details = fxslice.report(narrowed)["query_key"]
    assert not details["skipped"] and [k for _, _, k in details["heads"]] == [head_dim // 2] * arch.depth
    ids = example_ids(arch, 3, 5, seed=3)
    assert relative_error(narrowed(ids), model(ids)) < 1e-12
