"""register_stream_op: an op the analysis does not know is declared as commuting with a rotation of the last
dim, without editing fxslice; a custom op (torch.library) on the residual stream of a small model."""

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxslice
from conftest import relative_error
from fxslice import UnsupportedGraphError, fuse_norm, rotate, slice
from fxslice.analysis import FUSED_NORM, register_stream_op
from fxslice.plan import plan_of
from strategies import Arch, TinyLM, architectures, example_ids


@torch.library.custom_op("fxslice_test::token_scale", mutates_args=())
def token_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Every token's feature vector times its own scale: (x_t Q)·s_t = (x_t·s_t) Q."""
    return x * scale.unsqueeze(-1)


@token_scale.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("fxslice_test::token_shift", mutates_args=())
def token_shift(x: torch.Tensor, step: int) -> torch.Tensor:
    """Each token takes the previous token's vector (a shift along the sequence): commutes too."""
    return torch.roll(x, step, dims=-2).clone()


@token_shift.register_fake
def _(x, step):
    return torch.empty_like(x)


class ScaledLM(TinyLM):
    """A TinyLM whose residual stream passes through two custom ops between its blocks."""

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = self.blocks[0](x)
        x = token_scale(x, (input_ids % 3 + 1).to(x.dtype) / 2)  # a per-token scale from the inputs
        x = token_shift(x, 1)
        for block in self.blocks[1:]:
            x = block(x)
        return self.head(self.final_norm(x))


ARCH = Arch(width=32, heads=4, kv_heads=2, depth=2)


def compile_quietly(model, passes, calibration=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslice.compile(model, passes, calibration=calibration, example_inputs=(example_ids(ARCH, 2, 7),))


def calibrated_quarter(model):
    """``[fuse_norm, rotate, slice(0.25)]`` calibrated on two batches."""
    calibration = [(example_ids(ARCH, 4, 9, seed=s),) for s in range(2)]
    return compile_quietly(model, [fuse_norm, rotate, slice(0.25)], calibration)


def test_a_registered_custom_op_carries_the_stream():
    model = ScaledLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 9, seed=5)
    # Unknown, the ops read the stream (token_scale) and write it (token_shift) through an inserted linear
    # each: exact, but d × d each.
    with pytest.warns(UserWarning, match="fxslice_test.token_s.*register_stream_op"):
        bridged = fxslice.compile(model, [fuse_norm, rotate], example_inputs=(example_ids(ARCH, 2, 7),))
    assert len(plan_of(bridged).details["fuse_norm"]["bridged_ops"]) == 2
    assert relative_error(bridged(ids), model(ids)) < 1e-9

    register_stream_op("fxslice_test::token_scale")
    # A rule decides per node: here, only when the stream is the first argument.
    register_stream_op("fxslice_test::token_shift", rule=lambda node, operand: node.args[0] is operand)
    with torch.no_grad():
        expected = model(ids)
        rotated = compile_quietly(model, [fuse_norm, rotate, slice(0.0)])
        assert relative_error(rotated(ids), expected) < 1e-9
        sliced = compile_quietly(model, [fuse_norm, rotate, slice(0.25)])
        assert sliced(ids).shape == expected.shape
    widths = [s["width_after"] for s in fxslice.report(sliced)["states"]]
    assert len(widths) == 5 and min(widths) == 24 and fxslice.report(sliced)["skipped"] == []
    assert "bridged_ops" not in plan_of(sliced).details["fuse_norm"]


def test_register_stream_op_wants_schema_names():
    with pytest.raises(ValueError, match="schema names"):
        register_stream_op("token_scale")


class ScalarStreamLM(TinyLM):
    """The stream gets ``+ 0`` (an absent position embedding, as some models add it) and is scaled in place
    by a 0-dim buffer after every block (``hidden_states *= self.layer_scalar``): both commute with Q."""

    def __init__(self, arch):
        super().__init__(arch)
        self.register_buffer("layer_scalar", torch.tensor(0.7))

    def forward(self, input_ids):
        x = self.embed(input_ids) + 0
        for block in self.blocks:
            x = block(x)
            x *= self.layer_scalar
        return self.head(self.final_norm(x))


def test_adding_zero_and_scaling_in_place_by_a_scalar_tensor_carry_the_stream():
    model = ScalarStreamLM(ARCH).double().eval()
    fused = compile_quietly(model, [fuse_norm])
    rotated = compile_quietly(model, [fuse_norm, rotate])
    ids = example_ids(ARCH, 3, 5, seed=4)
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), fused(ids)) < 1e-12
    assert relative_error(fused(ids), model(ids)) < 1e-12


class ChannelScaledLM(TinyLM):
    """Learned per-channel weights on the residual branch, in two forms models use: ``s ⊙ x + block(x)`` and
    ``(x + b) ⊙ s + block(x)``; and zeros made from a norm's output (``normed.new_zeros(size)``, a delayed
    state's start, through a linear into the stream) and from the stream (``zeros_like``): they read no values."""

    def __init__(self, arch):
        super().__init__(arch)
        self.scales = nn.Parameter(torch.rand(arch.depth, arch.width) + 0.5)
        self.shift = nn.Parameter(torch.randn(arch.width) * 0.1)
        self.delayed = nn.ModuleList(nn.Linear(arch.width, arch.width) for _ in range(arch.depth))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            normed = block.norm1(x)
            start = self.delayed[i](normed.new_zeros(normed.shape[0], 1, self.arch.width))
            x = self.scales[i] * x + block.attn(normed) + start + torch.zeros_like(x)
            x = (x + self.shift) * self.scales[i] + block.mlp(block.norm2(x))
        return self.head(self.final_norm(x))


def test_a_per_channel_scale_of_the_stream_becomes_a_linear_and_rotates_exactly():
    model = ChannelScaledLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    fused = compile_quietly(model, [fuse_norm])
    assert len(plan_of(fused).details["fuse_norm"]["channel_scales"]) == 2 * ARCH.depth
    assert relative_error(fused(ids), model(ids)) < 1e-12
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = compile_quietly(model, [fuse_norm, rotate, slice(0.25)])
    widths = {s["width_after"] for s in fxslice.report(sliced)["states"]}
    assert widths == {24} and sliced(ids).shape == model(ids).shape
    # The shift every layer adds is copied per layer (else it is a state of its own, with no activations
    # for a calibrated rotation to sweep to): PCA runs on every state.
    calibrated = calibrated_quarter(model)
    assert [s["width_after"] for s in fxslice.report(calibrated)["states"]] == [24] * (3 * ARCH.depth + 1)
    assert calibrated(ids).shape == model(ids).shape


class DelayedValueLM(TinyLM):
    """A projection of the normed tokens shifted by one, its first row the same projection of a start state
    of zeros (a delayed value, written as models do when no cache holds the previous token's)."""

    def __init__(self, arch):
        super().__init__(arch)
        self.delayed = nn.ModuleList(nn.Linear(arch.width, 16) for _ in range(arch.depth))
        self.out = nn.ModuleList(nn.Linear(16, arch.width) for _ in range(arch.depth))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            normed = block.norm1(x)
            start = self.delayed[i](normed.new_zeros(normed.shape[0], 1, self.arch.width))
            x = x + block.attn(normed) + self.out[i](torch.cat([start, self.delayed[i](normed)[:, :-1]], 1))
            x = x + block.mlp(block.norm2(x))
        return self.head(self.final_norm(x))


def test_a_projection_of_zeros_reads_nothing_so_the_projection_narrows_with_the_stream():
    model = DelayedValueLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = compile_quietly(model, [fuse_norm, rotate, slice(0.25)])
    shapes = {tuple(w.shape) for name, w in sliced.named_parameters() if "delayed" in name and name.endswith("weight")}
    assert shapes == {(16, 24)}


class BroadcastBiasLM(TinyLM):
    """A bias broadcast to the stream's shape before it is added (``bias.expand_as(residual)``): the stream
    is read for its shape only."""

    def __init__(self, arch):
        super().__init__(arch)
        self.biases = nn.Parameter(torch.randn(arch.depth, arch.width) * 0.1)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = x + (block.attn(block.norm1(x)) + self.biases[i].expand_as(x))
            x = x + block.mlp(block.norm2(x))
        return self.head(self.final_norm(x))


def test_a_bias_expanded_to_the_streams_shape_rotates_and_slices_with_the_state_it_joins():
    model = BroadcastBiasLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    # Every state its own width: the expanded bias takes the width of the state it is added to.
    sliced = compile_quietly(model, [fuse_norm, rotate, slice(widths=lambda index, d: 16 + 8 * (index % 2))])
    assert {s["width_after"] for s in fxslice.report(sliced)["states"]} == {16, 24}
    assert sliced(ids).shape == model(ids).shape


class GatedSkipLM(TinyLM):
    """The skip scaled per channel by a function of a learned vector, ``exp(-softplus(w)/2) ⊙ x`` (a
    constant computed by pointwise ops the analysis has no list entry for), and an MLP that sees each
    token twice, ``repeat_interleave(h, 2, dim=0)``, as experts see a token once per route, the copies
    summed back."""

    def __init__(self, arch):
        super().__init__(arch)
        self.gates = nn.Parameter(torch.randn(arch.depth, arch.width) * 1.5)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = torch.exp(-0.5 * nn.functional.softplus(self.gates[i])) * x + block.attn(block.norm1(x))
            routes = block.norm2(x).reshape(-1, self.arch.width).repeat_interleave(2, dim=0)
            x = x + block.mlp(routes).reshape(*x.shape[:-1], 2, self.arch.width).sum(-2)
        return self.head(self.final_norm(x))


def test_a_skip_scaled_by_a_function_of_weights_and_tokens_repeated_per_route_rotate_without_bridges():
    model = GatedSkipLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    fused = compile_quietly(model, [fuse_norm])
    assert len(plan_of(fused).details["fuse_norm"]["channel_scales"]) == ARCH.depth
    rotated = compile_quietly(model, [fuse_norm, rotate])
    report = fxslice.report(rotated)
    assert not report["skipped"] and not any(r["bridges"] for r in report["fuse_norm"]["regions"])
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = calibrated_quarter(model)  # the state the head reads stays whole (as SliceGPT)
    assert [s["width_after"] for s in fxslice.report(sliced)["states"]] == [24] * (2 * ARCH.depth) + [32]


class RoutedExpertsLM(TinyLM):
    """Experts held as one 3-D weight per projection and applied one matrix at a time: each token's row
    gathered by its expert, the rows split by the count per expert (sizes computed from values), one
    ``F.linear(rows_e, W[e])`` per piece, the pieces put together with ``cat`` along the rows and added
    per token into zeros with ``index_add``."""

    experts, inner = 3, 16

    def __init__(self, arch):
        super().__init__(arch)
        self.routers = nn.ModuleList(nn.Linear(arch.width, self.experts, bias=False) for _ in range(arch.depth))
        self.ups = nn.ParameterList(torch.randn(self.experts, self.inner, arch.width) * 0.2 for _ in range(arch.depth))
        self.downs = nn.ParameterList(torch.randn(self.experts, arch.width, self.inner) * 0.2 for _ in range(arch.depth))

    def routed(self, i, h):
        batch, tokens, width = h.shape
        flat = h.reshape(-1, width)
        choice = self.routers[i](flat).argmax(-1)
        order = choice.argsort()
        pieces = flat[order].split(nn.functional.one_hot(choice, self.experts).sum(0).tolist(), 0)
        out = torch.cat([nn.functional.linear(nn.functional.gelu(nn.functional.linear(rows, self.ups[i][e])),
                                              self.downs[i][e]) for e, rows in enumerate(pieces)], 0)
        return torch.zeros(batch * tokens, width, dtype=h.dtype).index_add(0, order, out).view(batch, tokens, width)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = x + block.attn(block.norm1(x))
            x = x + self.routed(i, block.norm2(x))
        return self.head(self.final_norm(x))


def test_experts_applied_one_matrix_at_a_time_and_added_back_per_token_rotate_and_slice():
    model = RoutedExpertsLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    rotated = compile_quietly(model, [fuse_norm, rotate])
    report = fxslice.report(rotated)
    assert not report["skipped"] and not any(r["bridges"] for r in report["fuse_norm"]["regions"])
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = calibrated_quarter(model)
    shapes = {name: tuple(p.shape) for name, p in sliced.named_parameters() if name.startswith(("ups", "downs"))}
    # the last experts write the state the head reads, which slice(0.25) keeps whole (as SliceGPT)
    assert shapes == {"ups.0": (3, 16, 24), "ups.1": (3, 16, 24), "downs.0": (3, 24, 16), "downs.1": (3, 32, 16)}
    assert sliced(ids).shape == model(ids).shape


class BatchedExpertsLM(TinyLM):
    """Experts batched along a first dim: every token repeated once per expert and scaled by its router
    score, ``bmm`` with ``[E, d, i]`` and ``[E, i, d]`` weights, the experts' outputs summed."""

    experts, inner = 3, 16

    def __init__(self, arch):
        super().__init__(arch)
        self.routers = nn.ModuleList(nn.Linear(arch.width, self.experts, bias=False) for _ in range(arch.depth))
        self.ups = nn.ParameterList(torch.randn(self.experts, arch.width, self.inner) * 0.2 for _ in range(arch.depth))
        self.downs = nn.ParameterList(torch.randn(self.experts, self.inner, arch.width) * 0.2 for _ in range(arch.depth))

    def batched(self, i, h):
        flat = h.reshape(-1, h.shape[-1])
        scores = self.routers[i](flat).softmax(-1).transpose(0, 1).reshape(-1, 1)  # [E·N, 1]
        rows = (flat.repeat(self.experts, 1) * scores).view(self.experts, -1, h.shape[-1])
        out = torch.bmm(nn.functional.gelu(torch.bmm(rows, self.ups[i])), self.downs[i])
        return out.view(self.experts, -1, h.shape[-1]).sum(0).view(h.shape)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = x + block.attn(block.norm1(x))
            x = x + self.batched(i, block.norm2(x))
        return self.head(self.final_norm(x))


def test_experts_batched_along_a_first_dim_rotate_and_slice():
    model = BatchedExpertsLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    rotated = compile_quietly(model, [fuse_norm, rotate])
    report = fxslice.report(rotated)
    assert not report["skipped"] and not any(r["bridges"] for r in report["fuse_norm"]["regions"])
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = compile_quietly(model, [fuse_norm, rotate, slice(0.25)])
    shapes = {name: tuple(p.shape) for name, p in sliced.named_parameters() if name.startswith(("ups", "downs"))}
    assert shapes == {"ups.0": (3, 24, 16), "ups.1": (3, 24, 16), "downs.0": (3, 16, 24), "downs.1": (3, 16, 32)}
    assert sliced(ids).shape == model(ids).shape


class HyperConnectionsLM(TinyLM):
    """Hyper-connections (as DeepSeek-V4's): ``n`` copies of the stream, ``[batch, tokens, n, d]``. Around each
    block the copies are merged into one vector (a view, or flatten), normalised by an unweighted RMS norm
    written with casts, and one linear over all ``n·d`` features gives per-copy weights: ``pre`` collapses
    the copies into the block's input, ``post`` spreads its output back, ``comb`` (``n × n``, a matmul)
    mixes the copies. Each copy rotated by ``Q`` is the merged vector rotated by ``diag(Q, …, Q)``."""

    def __init__(self, arch, split: bool = False, copies: int = 3):
        super().__init__(arch)
        self.split = split  # the norm split around the linear: linear(x, W) * rsqrt(mean(x²) + eps), as HY-V4's
        self.copies = n = copies
        self.mixers = nn.ParameterList(torch.randn(2 * n + n * n, n * arch.width) * 0.3
                                       for _ in range(2 * arch.depth + 1))
        self.gammas = nn.ParameterList(1 + 0.3 * torch.randn(n * arch.width) for _ in range(2 * arch.depth + 1))

    def coefficients(self, i, streams, merge):
        n = self.copies
        x = merge(streams)
        factor = torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6).to(x.dtype)
        if self.split:
            mixed = nn.functional.linear(x, self.mixers[i]) * factor
        else:  # a norm with a scale of its own (γ over all n·d features)
            mixed = nn.functional.linear(x * factor * self.gammas[i], self.mixers[i])
        pre, post, comb = mixed.split([n, n, n * n], -1)
        return pre.sigmoid(), 2 * post.sigmoid(), comb.view(*comb.shape[:-1], n, n).softmax(-1)

    def connect(self, i, streams, branch):
        pre, post, comb = self.coefficients(i, streams, lambda s: s.view(*s.shape[:2], -1))
        out = branch((pre.unsqueeze(-1) * streams).sum(2))
        return post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), streams)

    def forward(self, input_ids):
        streams = self.embed(input_ids).unsqueeze(2).repeat(1, 1, self.copies, 1)
        for j, block in enumerate(self.blocks):
            streams = self.connect(2 * j, streams, lambda h: block.attn(block.norm1(h)))
            streams = self.connect(2 * j + 1, streams, lambda h: block.mlp(block.norm2(h)))
        pre, _, _ = self.coefficients(-1, streams, lambda s: s.flatten(2))
        return self.head(self.final_norm((pre.unsqueeze(-1) * streams).sum(2)))


@pytest.mark.parametrize("split", [False, True], ids=["norm", "norm-split-around-the-linear"])
def test_copies_of_the_stream_mixed_and_merged_by_hyper_connections_rotate_exactly_and_slice(split):
    model = HyperConnectionsLM(ARCH, split).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    fused = compile_quietly(model, [fuse_norm])
    rotated = compile_quietly(model, [fuse_norm, rotate])
    report = fxslice.report(rotated)
    assert not report["skipped"] and len(report["states"]) == 2 * ARCH.depth + 1
    # The model's own norms square in float32 (x.float()); fxslice's compute in the stream's float64.
    assert relative_error(fused(ids), model(ids)) < 1e-6
    assert relative_error(rotated(ids), fused(ids)) < 1e-12
    mixers = dict(rotated.named_parameters())["mixers.0"]
    assert not torch.allclose(mixers, model.mixers[0].double())  # the merged copies' Q folded into the mixer
    sliced = calibrated_quarter(model)
    widths = [s["width_after"] for s in fxslice.report(sliced)["states"]]
    assert widths == [24] * (len(widths) - 1) + [32], widths  # the head's state keeps its width
    # Every mixer reads three copies of its state: 3 · 24 features (the last, 3 · 32).
    parameters = dict(sliced.named_parameters())
    mixers = [parameters[f"mixers.{i}"].shape[1] for i in range(len(widths))]
    assert mixers == [72] * (len(widths) - 1) + [96], mixers
    assert fxslice.report(sliced)["parameters"]["after"] < fxslice.report(sliced)["parameters"]["before"]
    assert relative_error(sliced(ids), model(ids)) < 1.0


def rotates_exactly_unless_layer_norms_would_centre_it(model, arch):
    """``[fuse_norm, rotate]`` equals ``[fuse_norm]`` in float64; with LayerNorm blocks the model is refused:
    centring the stream would change the RMS norm over the values merged with it."""
    model = model.double().eval()
    if arch.norm == "layer":
        with pytest.raises(UnsupportedGraphError, match="cannot be centred"):
            compile_quietly(model, [fuse_norm])
        return
    ids = example_ids(arch, 2, 6, seed=3)
    fused = compile_quietly(model, [fuse_norm])
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), fused(ids)) < 1e-9, arch


@settings(max_examples=6)
@given(architectures(), st.integers(1, 4), st.booleans())
def test_hyper_connections_around_generated_blocks_rotate_exactly_unless_layer_norms_would_centre_the_copies(
        arch, copies, split):
    rotates_exactly_unless_layer_norms_would_centre_it(HyperConnectionsLM(arch, split, copies), arch)


class SideBySideLM(TinyLM):
    """Zamba's shared block: before each block the stream and the token embeddings are put side by side
    (``cat`` along the last dim) and read through one RMS norm over both (a scale of its own, ``2d`` wide)
    by a linear that writes back into the stream. Both pieces are held to one rotation, so the linear takes
    one ``Q`` in each half."""

    def __init__(self, arch):
        super().__init__(arch)
        d = arch.width
        self.scales = nn.ParameterList(1 + 0.3 * torch.randn(2 * d) for _ in range(arch.depth))
        self.readers = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(arch.depth))

    def forward(self, input_ids):
        x = embedded = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            both = torch.cat([x, embedded], -1)
            x = x + self.readers[i](both * torch.rsqrt(both.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scales[i])
            x = x + block.mlp(block.norm2(x))
        return self.head(self.final_norm(x))


def test_the_stream_side_by_side_with_the_embeddings_rotates_exactly_and_slices():
    model = SideBySideLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = calibrated_quarter(model)
    widths = {s["width_after"] for s in fxslice.report(sliced)["states"]}
    parameters = dict(sliced.named_parameters())
    # Each reader takes both halves at the one width of the states put side by side.
    assert {parameters[f"readers.{i}.weight"].shape[1] for i in range(ARCH.depth)} <= {2 * w for w in widths}
    assert sliced(ids).shape == model(ids).shape


@settings(max_examples=4)
@given(architectures())
def test_the_stream_beside_its_embeddings_in_generated_blocks_rotates_exactly_unless_layer_norms_would_centre_it(arch):
    rotates_exactly_unless_layer_norms_would_centre_it(SideBySideLM(arch), arch)


class SphereLM(TinyLM):
    """nGPT (transformers' dory): every hidden state on the unit sphere. The stream is renormalised in place
    by an L2 norm (``x·rsqrt(Σx² + eps)``: no ``γ``) and each block moves it part way towards its own
    normalised output at a learned per-channel rate, ``h ← norm(h + |α| ⊙ (norm(block(h)) − h))``."""

    def __init__(self, arch):
        super().__init__(arch)
        self.rates = nn.Parameter(torch.rand(arch.depth, 2, arch.width) - 0.5)

    @staticmethod
    def sphere(x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)

    def forward(self, input_ids):
        h = self.sphere(self.embed(input_ids))
        for i, block in enumerate(self.blocks):
            h = self.sphere(h + self.rates[i, 0].abs() * (self.sphere(block.attn(h)) - h))
            h = self.sphere(h + self.rates[i, 1].abs() * (self.sphere(block.mlp(h)) - h))
        return self.head(h)


def test_a_stream_renormalised_in_place_rotates_exactly_and_slices():
    model = SphereLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = calibrated_quarter(model)
    assert {s["width_after"] for s in fxslice.report(sliced)["states"]} == {24}
    # norm(xQ) = norm(x)Q needs no linear after it: only the per-channel rates became one each.
    details = plan_of(sliced).details["fuse_norm"]
    assert not details["post_norms"] and len(details["channel_scales"]) == 2 * ARCH.depth
    # The sliced stream's norms keep dividing by the unsliced width; all but the last (the head reads it)
    # stay in the stream.
    kept = [n.meta[FUSED_NORM] for n in sliced.graph.nodes if FUSED_NORM in n.meta]
    assert {k.width for k in kept} == {ARCH.width} and sum(k.in_stream for k in kept) == len(kept) - 1 == 4 * ARCH.depth
    assert relative_error(sliced(ids), model(ids)) < 1.0


class OneOpSphereLM(SphereLM):
    """The same stream renormalised by a single weightless ``rms_norm`` op (``F.rms_norm(x, (d,))``) rather
    than one written out."""

    @staticmethod
    def sphere(x):
        return nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6)


def test_a_stream_renormalised_in_place_by_one_rms_norm_op_rotates_without_inserted_linears():
    model = OneOpSphereLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = calibrated_quarter(model)
    assert not plan_of(sliced).details["fuse_norm"]["post_norms"]
    kept = [n.meta[FUSED_NORM] for n in sliced.graph.nodes if FUSED_NORM in n.meta]
    assert {k.width for k in kept} == {ARCH.width} and sum(k.in_stream for k in kept) == len(kept) - 1 == 4 * ARCH.depth
    assert {s["width_after"] for s in fxslice.report(sliced)["states"]} == {24}
    assert relative_error(sliced(ids), model(ids)) < 1.0


class LoopedLM(TinyLM):
    """Layers run more than once (transformers' hrm_text, dory): the same blocks, norms included, are applied
    ``loops`` times, each pass starting from the last one's output renormalised (RMS, no ``γ``) plus the
    embeddings."""

    def __init__(self, arch, loops: int = 2):
        super().__init__(arch)
        self.loops = loops

    def forward(self, input_ids):
        x = self.embed(input_ids)
        z = torch.zeros_like(x)
        for _ in range(self.loops):
            z = z + x
            for block in self.blocks:
                z = block(z)
            z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head(self.final_norm(z))


def test_layers_run_more_than_once_take_one_rotation_and_fold_each_norm_once():
    model = LoopedLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    fused = compile_quietly(model, [fuse_norm])
    assert not any(r["bridges"] for r in plan_of(fused).details["fuse_norm"]["regions"])  # γ folded once per weight
    assert relative_error(fused(ids), model(ids)) < 1e-12
    rotated = compile_quietly(model, [fuse_norm, rotate])
    report = fxslice.report(rotated)
    assert not report["skipped"] and len(report["states"]) == 1
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = calibrated_quarter(model)
    assert fxslice.report(sliced)["parameters"]["ratio"] < 0.9
    assert relative_error(sliced(ids), model(ids)) < 1.0


@settings(max_examples=6)
@given(architectures(), st.integers(2, 3))
def test_generated_blocks_run_more_than_once_rotate_exactly_unless_layer_norms_would_centre_the_stream(arch, loops):
    rotates_exactly_unless_layer_norms_would_centre_it(LoopedLM(arch, loops), arch)


class OpaqueOpsLM(TinyLM):
    """Ops that read or write the stream's vectors without commuting with a rotation: a norm gated by a
    feature-wise sigmoid of itself (axk2's ``y * sigmoid(mlp(y))`` in front of attention), a ``tanh`` on
    the MLP's output before it joins the stream (rwkv's gated outputs) and, where ``stream_read``, a
    ``tanh`` of the stream itself whose projection goes back into it."""

    def __init__(self, arch, stream_read: bool = True):
        super().__init__(arch)
        self.stream_read = stream_read
        self.gates = nn.ModuleList(nn.Sequential(nn.Linear(arch.width, 4, bias=False), nn.SiLU(),
                                                 nn.Linear(4, arch.width, bias=False)) for _ in range(arch.depth))
        self.squashed = nn.ModuleList(nn.Linear(arch.width, arch.width) for _ in range(arch.depth))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block, gate, squashed in zip(self.blocks, self.gates, self.squashed):
            y = block.norm1(x)
            x = x + block.attn(y * torch.sigmoid(gate(y)))
            if self.stream_read:
                x = x + squashed(torch.tanh(x))
            x = x + torch.tanh(block.mlp(block.norm2(x)))
        return self.head(self.final_norm(x))


WIDE = Arch(width=32, heads=4, kv_heads=2, depth=2, mlp=128)
"""MLPs wide enough that the weights on the stream pay for three bridges a block."""


def test_ops_that_read_or_write_the_stream_without_commuting_do_so_through_an_inserted_linear():
    model = OpaqueOpsLM(WIDE).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    fused = compile_quietly(model, [fuse_norm])
    # One I per gated norm (on the edge into the multiply; the gate's own linear reads the norm), per
    # tanh of the stream and per tanh written into it.
    assert len(plan_of(fused).details["fuse_norm"]["bridged_ops"]) == 3 * ARCH.depth
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), model(ids)) < 1e-12
    sliced = calibrated_quarter(model)
    assert {s["width_after"] for s in fxslice.report(sliced)["states"]} == {24}
    shapes = dict((name, p.shape) for name, p in sliced.named_parameters() if "_bridge" in name)
    readers = [shape for name, shape in shapes.items() if "reader_bridge" in name]
    writers = [shape for name, shape in shapes.items() if "writer_bridge" in name]
    assert readers == [(ARCH.width, 24)] * 2 * ARCH.depth and writers == [(24, ARCH.width)] * ARCH.depth
    assert relative_error(sliced(ids), model(ids)) < 1.0


def test_a_centred_streams_own_vector_is_not_bridged_its_mean_would_be_lost():
    arch = Arch(width=32, heads=4, kv_heads=2, depth=2, mlp=128, norm="layer", bias=True)
    with pytest.raises(UnsupportedGraphError, match="read by an op fxslice cannot rotate through"):
        compile_quietly(OpaqueOpsLM(arch).double().eval(), [fuse_norm])
    # Without the tanh of the stream itself, a norm's output and a block's output are bridged on a centred
    # stream as on any other.
    fused = compile_quietly(OpaqueOpsLM(arch, stream_read=False).double().eval(), [fuse_norm])
    assert len(plan_of(fused).details["fuse_norm"]["bridged_ops"]) == 2 * arch.depth


def test_bridges_are_not_inserted_where_slicing_a_quarter_would_not_pay_for_them():
    # 3 bridges a block of 32 x 32 against about 7.5k parameters a block on the stream: 3·3·1024 > 7.5k
    with pytest.raises(UnsupportedGraphError, match="read by an op fxslice cannot rotate through"):
        compile_quietly(OpaqueOpsLM(ARCH).double().eval(), [fuse_norm])


@settings(max_examples=6)
@given(architectures())
def test_gated_norms_and_squashed_outputs_in_generated_blocks_rotate_exactly(arch):
    arch = dataclasses.replace(arch, mlp=16 * arch.width)  # weights on the stream that pay for the bridges
    model = OpaqueOpsLM(arch, stream_read=False).double().eval()
    ids = example_ids(arch, 2, 6, seed=3)
    fused = compile_quietly(model, [fuse_norm])
    rotated = compile_quietly(model, [fuse_norm, rotate])
    assert not fxslice.report(rotated)["skipped"]
    assert relative_error(rotated(ids), fused(ids)) < 1e-9, arch
    assert relative_error(fused(ids), model(ids)) < 1e-9, arch


class DifferentialLM(TinyLM):
    """A residual-like value inside each block that no weight writes or reads (diffllama's two attention
    halves subtracted and normed): its ends are ops that would need bridges, and bridges alone would
    rotate nothing but themselves, so it is left as it is."""

    def __init__(self, arch):
        super().__init__(arch)
        self.pairs = nn.ModuleList(nn.Linear(arch.width, arch.width, bias=False) for _ in range(arch.depth))
        self.inner_norms = nn.ModuleList(nn.RMSNorm(arch.width // 2) for _ in range(arch.depth))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block, pair, inner_norm in zip(self.blocks, self.pairs, self.inner_norms):
            a, b = pair(block.norm1(x)).chunk(2, -1)
            v = inner_norm(a - 0.5 * b)
            x = x + block.attn(torch.stack([v, -v], -2).flatten(-2))
            x = x + block.mlp(block.norm2(x))
        return self.head(self.final_norm(x))


def test_a_value_no_weight_writes_or_reads_gets_no_bridges():
    model = DifferentialLM(ARCH).double().eval()
    ids = example_ids(ARCH, 3, 5, seed=4)
    with pytest.warns(UserWarning, match="left unchanged"):
        rotated = fxslice.compile(model, [fuse_norm, rotate], example_inputs=(example_ids(ARCH, 2, 7),))
    assert "bridged_ops" not in plan_of(rotated).details["fuse_norm"]
    assert len(fxslice.report(rotated)["skipped"]) == 2 * ARCH.depth  # fuse_norm and rotate, each block's value
    assert relative_error(rotated(ids), model(ids)) < 1e-12
