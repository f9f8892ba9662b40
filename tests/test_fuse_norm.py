"""fuse_norm is exact: LayerNorm → RMSNorm by centring, γ/β folded into the linears that read the norm."""

import dataclasses

import pytest
import torch
from hypothesis import given

import fxslice
from fxslice import fuse_norm, rotate, slice
from fxslice.analysis import find_norms
from helpers import compile_and_compare, ops
from conftest import relative_error
from strategies import Arch, GroupedExperts, TinyLM, architectures, example_ids

aten = torch.ops.aten


@given(architectures())
def test_fuse_norm_preserves_logits(arch):
    _, error = compile_and_compare(arch, [fuse_norm])
    assert error <= 1e-9, f"relative logit error {error:.3g} after fuse_norm on {arch}"


@given(architectures())
def test_every_stream_norm_becomes_weightless_rms(arch):
    gm, _ = compile_and_compare(arch, [fuse_norm])
    norms = find_norms(gm)
    readers = [n for n in norms if n.fused is not None]
    # Pre-norms of each block (2 per block) and the final norm read the stream; a norm on the sum of token
    # and position embeddings reads a stream too (that sum is a residual add).
    embeddings_stream = arch.embed_norm and arch.learned_pos
    assert len(readers) == 2 * arch.depth + 1 + embeddings_stream
    assert all(n.kind == "rms" and n.weight is None and n.bias is None for n in readers)
    if arch.norm == "layer" and not arch.post_norms and not arch.embed_norm:
        assert not ops(gm, aten.layer_norm), "a LayerNorm survived on the stream"
    # Post-norms stay weightless norms of their own input, each followed by one inserted linear; the
    # head's own norm (off every stream) keeps its parameters.
    post = [n for n in norms if n.fused is None]
    stream_post = (2 * arch.depth if arch.post_norms else 0) + (arch.embed_norm and not embeddings_stream)
    assert len(post) == stream_post + arch.head_transform
    assert sum(n.weight is not None or n.bias is not None for n in post) == arch.head_transform


@pytest.mark.parametrize("root", ["rsqrt", "pow", "div_sqrt", "div_pow"])
def test_an_rms_norm_written_out_with_any_root_is_found_and_made_weightless(root):
    arch = Arch(width=16, heads=2, depth=2, norm="rms_offset", root=root)
    gm, error = compile_and_compare(arch, [fuse_norm, rotate])
    assert error <= 1e-9
    readers = [n for n in find_norms(gm) if n.fused is not None]
    assert len(readers) == 2 * arch.depth + 1 and not any(ops(gm, op) for op in (aten.rsqrt, aten.pow, aten.sqrt))


@given(architectures())
def test_fuse_norm_with_a_tied_head_and_a_norm_on_the_embeddings(arch):
    # The shared embedding is then not a stream source: it must not be treated as centred.
    arch = dataclasses.replace(arch, tied=True, embed_norm=True)
    _, error = compile_and_compare(arch, [fuse_norm])
    assert error <= 1e-9, f"relative logit error {error:.3g} after fuse_norm on {arch}"


def test_a_layernorm_bias_before_experts_goes_into_a_bridge():
    # (x + β)W_e = xW_e + βW_e would need a bias per expert: the norm's γ and β go into a bridge instead.
    arch = Arch(width=16, heads=2, depth=2, norm="layer", bias=True)
    model = TinyLM(arch)
    for block in model.blocks:
        block.mlp = GroupedExperts(arch.width)
    model = model.double().eval()
    ids = example_ids(arch, 3, 5, seed=3)
    compiled = fxslice.compile(model, [fuse_norm, rotate], example_inputs=(example_ids(arch, 2, 7),))
    assert relative_error(compiled(ids), model(ids)) <= 1e-9
    regions = fxslice.report(compiled)["fuse_norm"]["regions"]
    assert [b for r in regions for b in r["bridges"]] == ["blocks.0.mlp", "blocks.1.mlp"]
    calibration = [example_ids(arch, 4, 9, seed=s) for s in (10, 11)]
    sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=calibration,
                             example_inputs=(example_ids(arch, 2, 7),))
    widths = {s["width_after"] for s in fxslice.report(sliced)["states"]}  # 12 rounds down to 8; the head's stay
    assert sliced(ids).shape == model(ids).shape and widths == {8, 16}


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_tied_head_stays_tied_behind_a_bridge(norm):
    # With LayerNorm the shared embedding is centred (E ← EC); a rank-1 correction keeps the head exact.
    arch = Arch(norm=norm, tied=True, bias=True)
    gm, error = compile_and_compare(arch, [fuse_norm])
    report = fxslice.report(gm)
    entry = report["fuse_norm"]["regions"][0]
    assert error <= 1e-9 and entry["bridges"] == ["head"] and entry["centred"] == (norm == "layer")
    (embedding,) = ops(gm, aten.embedding)
    head = [n for n in ops(gm, aten.linear) if n.args[1].target == embedding.args[0].target]
    assert len(head) == 1, "the head no longer shares the embedding's weight"
    # bridge d×d (+ d bias), and for LayerNorm the correction: d + V weights and V biases.
    added = arch.width ** 2 + (arch.width + 2 * arch.vocab if norm == "layer" else arch.width)
    removed = (4 if norm == "layer" else 2) * arch.depth * arch.width + 2 * arch.width
    assert report["parameters"]["after"] - report["parameters"]["before"] <= added - removed + 4 * arch.width * arch.depth


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_a_head_tied_to_the_embedding_behind_a_norm_of_its_own_takes_the_rotation_through_a_bridge(norm):
    # BERT-style heads: final norm, dense, gelu, the head's own norm, then the decoder tied to the embedding,
    # which writes the stream directly. The decoder's input gets an inserted I (rotate makes it Q), and
    # where the stream is centred, the mean the centred embedding loses comes back as a rank-1 term.
    arch = Arch(norm=norm, tied=True, bias=True, head_transform=True)
    gm, error = compile_and_compare(arch, [fuse_norm, rotate])
    assert error <= 1e-9 and not fxslice.report(gm)["skipped"]
    (embedding,) = ops(gm, aten.embedding)
    assert len([n for n in ops(gm, aten.linear) if n.args[1].target == embedding.args[0].target]) == 1
    sliced, _ = compile_and_compare(arch, [fuse_norm, rotate, slice(0.25)])
    assert min(s["width_after"] for s in fxslice.report(sliced)["states"]) < arch.width


def test_norm_weights_are_removed_from_the_module():
    arch = Arch(norm="layer", bias=True)
    gm, _ = compile_and_compare(arch, [fuse_norm])
    names = [name for name, _ in gm.named_parameters()]
    assert not [n for n in names if "norm" in n], names


def test_fuse_norm_does_not_modify_the_original_model():
    from helpers import tiny

    model = tiny(Arch(norm="layer", bias=True, tied=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxslice.compile(model, [fuse_norm], example_inputs=(torch.zeros(2, 4, dtype=torch.long),))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("tied", [False, True])
def test_a_norm_on_summed_embeddings_reads_one_stream_and_writes_the_next(tied):
    # embed + pos is a residual add, so the embedding norm reads stream 0 and writes stream 1: both are
    # centred and rotated; a tied head (a sink of stream 1) shares the weight centred in stream 0.
    arch = Arch(width=8, heads=2, depth=2, norm="layer", learned_pos=True, embed_norm=True, tied=tied)
    gm, error = compile_and_compare(arch, [fuse_norm, rotate, slice(0.0)])
    assert error <= 1e-9, f"relative logit error {error:.3g}"
    entries = fxslice.report(gm)["fuse_norm"]["regions"]
    assert [e["centred"] for e in entries] == [True, True]
    assert entries[1]["bridges"] == (["head"] if tied else [])
