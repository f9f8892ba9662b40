"""rotate is exact: per-state and shared rotations, skip matrices Q_iᵀQ_j, orthogonal Q."""


import pytest
import torch
from hypothesis import given

import fxslice
from fxslice import Rotate, fuse_norm, rotate
from fxslice.analysis.regions import bind_parameters, find_regions
from fxslice.graph import INSERTED, copy_graph, get_tensor
from fxslice.passes import random_orthogonal
from fxslice.rewrite import rotate_state, slice_state
from helpers import compile_and_compare
from strategies import Arch, architectures


@given(architectures())
def test_rotate_preserves_logits(arch):
    _, error = compile_and_compare(arch, [fuse_norm, rotate])
    assert error <= 1e-9, f"relative logit error {error:.3g} after rotate on {arch}"


@given(architectures())
def test_shared_rotation_preserves_logits_and_inserts_no_skip(arch):
    gm, error = compile_and_compare(arch, [fuse_norm, Rotate(shared=True, seed=5)])
    assert error <= 1e-9, f"relative logit error {error:.3g} after shared rotate on {arch}"
    report = fxslice.report(gm)
    # One state per residual stream (an embedding norm starts a second stream after the embeddings).
    assert report["rotation"]["skip_matrices"] == 0
    assert len(report["states"]) == len(report["fuse_norm"]["regions"]) == 1 + (arch.embed_norm and arch.learned_pos)


@pytest.mark.parametrize("width", [3, 4, 17, 64])
def test_random_rotation_is_orthogonal(width):
    q = random_orthogonal(width, seed=3)
    assert torch.allclose(q.T @ q, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(q, torch.eye(width, dtype=torch.float64))


def test_skip_matrices_are_products_of_orthogonal_matrices():
    arch = Arch(depth=3, width=16, heads=2)
    gm, error = compile_and_compare(arch, [fuse_norm, rotate])
    skips = {n: p for n, p in getattr(gm, INSERTED).named_parameters() if n.startswith("skip")}
    # Sequential blocks: one skip per residual add, two adds per block.
    assert len(skips) == 2 * arch.depth and error <= 1e-9
    for name, s in skips.items():
        s = s.double()
        assert torch.allclose(s @ s.T, torch.eye(16, dtype=torch.float64), atol=1e-12), name
        assert not torch.allclose(s, torch.eye(16, dtype=torch.float64)), f"{name} was never rotated"


def test_states_follow_the_residual_adds():
    sequential = fxslice.report(compile_and_compare(Arch(depth=2), [fuse_norm, rotate])[0])
    parallel = fxslice.report(compile_and_compare(Arch(depth=2, parallel=True), [fuse_norm, rotate])[0])
    # Embedding + one state per add (sequential) or per block (parallel: x + attn + mlp is one state).
    assert len(sequential["states"]) == 5 and sequential["rotation"]["skip_matrices"] == 4
    assert len(parallel["states"]) == 3 and parallel["rotation"]["skip_matrices"] == 2


def test_rotate_in_float32_is_close():
    _, error = compile_and_compare(Arch(norm="layer", bias=True, depth=3), [fuse_norm, rotate], dtype=torch.float32)
    assert error <= 1e-4, error


def test_folding_the_first_k_columns_of_q_equals_rotating_then_narrowing():
    # Sources W ← W Q then keep k columns = W Q[:, :k]; sinks likewise on their input axis.
    gm, _ = compile_and_compare(Arch(depth=2, width=16, heads=2), [fuse_norm])
    q = random_orthogonal(16, seed=0)
    results = []
    for columns in (16, 8):
        copied = copy_graph(gm)
        (region,) = bind_parameters(copied, find_regions(copied))
        state = region.states[1]
        rotate_state(copied, state, q[:, :columns])
        slice_state(copied, state, 8)
        results.append({side.target: get_tensor(copied, side.target) for side, _ in state.param_axes()})
    full, first = results
    assert full.keys() == first.keys() and len(full) >= 3
    for name in full:
        assert full[name].shape == first[name].shape and 8 in full[name].shape, name
        torch.testing.assert_close(first[name], full[name], rtol=1e-13, atol=1e-13, msg=name)
