"""slice: slice(0) is exact; widths, shapes and parameter counts follow the schedule; bad input fails."""

import pytest
import torch
from hypothesis import given

import fxslice
from fxslice import Slice, fuse_norm, rotate, slice
from helpers import compile_and_compare, ops
from strategies import Arch, architectures


@given(architectures())
def test_slice_zero_is_exact(arch):
    _, error = compile_and_compare(arch, [fuse_norm, rotate, slice(0.0)])
    assert error <= 1e-9, f"relative logit error {error:.3g} after slice(0) on {arch}"


@given(architectures())
def test_slice_shrinks_every_state_and_the_parameter_count(arch):
    gm, _ = compile_and_compare(arch, [fuse_norm, rotate, slice(0.5, multiple_of=2, head=True)])
    report = fxslice.report(gm)
    expected = max(arch.width // 4 * 2, 2)
    assert [s["width_after"] for s in report["states"]] == [expected] * len(report["states"])
    if not arch.post_norms:  # each post-norm adds a d × k linear, which can outweigh tiny savings
        assert report["parameters"]["after"] < report["parameters"]["before"]


def test_sliced_graph_runs_at_new_shapes_with_sliced_weights():
    arch = Arch(width=32, heads=4, kv_heads=2, depth=2)
    gm, _ = compile_and_compare(arch, [fuse_norm, rotate, slice(0.25, head=True)])
    ids = torch.randint(0, arch.vocab, (5, 9))
    assert gm(ids).shape == (5, 9, arch.vocab)
    assert gm.embed.weight.shape == (arch.vocab, 24)
    # Readers of the stream lose input columns, writers output rows; skip matrices are 24 × 24.
    shapes = {n.args[1].target: tuple(n.args[1].meta["val"].shape) for n in ops(gm, torch.ops.aten.linear)}
    for target, shape in shapes.items():
        if target.endswith((".q.weight", ".k.weight", ".v.weight", ".up.weight", ".gate.weight", "head.weight")):
            assert shape[1] == 24, (target, shape)
        elif target.endswith((".o.weight", ".down.weight")):
            assert shape[0] == 24, (target, shape)
        else:
            assert target.startswith("fxslice_inserted.skip") and shape == (24, 24), (target, shape)


def test_norms_keep_dividing_by_the_original_width():
    arch = Arch(width=32, heads=4, depth=1)
    gm, _ = compile_and_compare(arch, [fuse_norm, rotate, slice(0.25, head=True)])
    norms = ops(gm, torch.ops.aten.rms_norm)
    assert norms and all(n.args[1] == [24] and n.args[3] == pytest.approx(1e-6 * 32 / 24) for n in norms)


def test_explicit_widths_per_state():
    arch = Arch(width=32, heads=4, depth=1)
    gm, _ = compile_and_compare(arch, [fuse_norm, rotate, slice(widths={0: 32, 1: 16, 2: 8})])
    assert [s["width_after"] for s in fxslice.report(gm)["states"]] == [32, 16, 8]
    gm, _ = compile_and_compare(arch, [fuse_norm, rotate, slice(widths=lambda i, d: d - 8 * i)])
    assert [s["width_after"] for s in fxslice.report(gm)["states"]] == [32, 24, 16]


@pytest.mark.parametrize("tied, head, expected", [
    (False, None, [24, 24, 32]),  # the final state feeds the head: kept whole, as SliceGPT keeps its head
    (True, False, [32, 24, 32]),  # a tied head also reads the embedding's state
    (True, True, [24, 24, 24]),  # head=True slices them too
])
def test_states_the_head_reads_keep_their_width_unless_asked(tied, head, expected):
    arch = Arch(width=32, heads=4, depth=1, tied=tied)
    gm, error = compile_and_compare(arch, [fuse_norm, rotate, slice(0.25, head=head)])
    report = fxslice.report(gm)
    assert [s["width_after"] for s in report["states"]] == expected


@pytest.mark.parametrize("head, expected", [(None, [24, 24, 24]), (False, [32, 24, 32])])
def test_a_head_tied_to_a_dominant_embedding_is_sliced_unless_that_keeps_the_model_from_shrinking(head, expected):
    """Gemma's shape: a 262k-token tied embedding holds most of the model and every post-norm writes the
    stream through an inserted linear; keeping the head's states whole would leave it larger than dense."""
    arch = Arch(width=32, heads=4, depth=1, tied=True, vocab=2000, post_norms=True)
    gm, error = compile_and_compare(arch, [fuse_norm, rotate, slice(0.25, head=head)])
    report = fxslice.report(gm)
    assert [s["width_after"] for s in report["states"]] == expected
    assert (report["parameters"]["ratio"] < 1.0) == (head is None), report["parameters"]


def test_widths_must_fit_the_state():
    with pytest.raises(fxslice.UnsupportedGraphError, match="not an integer"):
        compile_and_compare(Arch(width=32, heads=4, depth=1), [fuse_norm, rotate, slice(widths={1: 40})])


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.25", True])
def test_ratio_outside_the_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        slice(ratio)


def test_slice_needs_a_ratio_or_widths():
    with pytest.raises(ValueError, match="exactly one"):
        Slice()


def test_default_width_is_rounded_down_to_a_multiple_of_eight():
    assert slice(0.25).width(0, 576) == 432
    assert slice(0.3).width(0, 576) == 400
    assert slice(0.1).width(0, 100) == 88
    assert slice(0.0).width(0, 100) == 100
    assert slice(0.5).width(0, 4) == 4
