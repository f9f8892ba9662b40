"""shrink_mlp: MLPs found by op pattern, exact at ratio 0, channels chosen and the down projection refit
so the MLP's output is kept; saved, reloaded and decoded like every other pass."""

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import nn

import fxslice
from conftest import relative_error
from fxslice import UnsupportedGraphError, fuse_norm, rotate, shrink_mlp, slice
from fxslice.analysis.mlps import find_mlps
from fxslice.analysis.regions import find_regions
from fxslice.calibrate import (FeatureSquares, RotatedSquares, backward_statistics, check_calibration, first_sequences,
                               fold_rotations, output_sensitivity, projected_loss, sweep_inner)
from fxslice.passes.shrink_mlp import curve_at, error_curve, prune_channels, sensitive_widths
from fxslice.passes import run_passes
from fxslice.passes.base import Context
from fxslice.passes.rotate import KEPT_WHOLE, random_orthogonal
from fxslice.plan import plan_of
from hf_zoo import LISTED, tiny_model
from strategies import Arch, GroupedExperts, TinyLM, example_ids, architectures


def _compile(model, passes, calibration, example_inputs=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslice.compile(model, passes, calibration=calibration, example_inputs=example_inputs)


def _arch_calibration(arch: Arch) -> list:
    return [example_ids(arch, 4, 9, seed=s) for s in (10, 11)]


def _reloads_and_decodes(shrunk, directory, ids, steps: int):
    """Saved and loaded, the model computes the same logits, and its cached ``generate`` is greedy decoding."""
    fxslice.save(shrunk, directory)
    loaded = fxslice.load(directory)
    assert torch.equal(loaded(input_ids=ids).logits, shrunk(input_ids=ids).logits)
    out = loaded.generate(ids, max_new_tokens=steps, do_sample=False)
    chain = ids
    for _ in range(steps):
        chain = torch.cat([chain, loaded(input_ids=chain).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, chain)
    return loaded


@given(architectures())
def test_shrink_mlp_zero_is_exact(arch):
    model = TinyLM(arch).double().eval()
    ids = example_ids(arch, 3, 5, seed=3)
    shrunk = _compile(model, [shrink_mlp(0.0)], _arch_calibration(arch), (example_ids(arch),))
    assert relative_error(shrunk(ids), model(ids)) <= 1e-12
    widths = fxslice.report(shrunk)["inner"]["mlps"]
    assert [(m, k) for _, m, k in widths] == [(arch.mlp, arch.mlp)] * arch.depth


@given(architectures())
def test_every_mlp_keeps_the_channels_asked_and_the_count_follows(arch):
    model = TinyLM(arch).double().eval()
    shrunk = _compile(model, [shrink_mlp(0.5, multiple_of=2)], _arch_calibration(arch), (example_ids(arch),))
    keep, gone = arch.mlp // 2, arch.mlp - arch.mlp // 2
    assert [k for _, _, k in fxslice.report(shrunk)["inner"]["mlps"]] == [keep] * arch.depth
    # Each up loses `gone` rows of `width` (and `gone` bias entries), the down projection `gone` columns.
    ups = 2 if arch.gated else 1
    per_block = gone * (ups * (arch.width + arch.bias) + arch.width)
    before = sum(p.numel() for p in model.parameters())  # a tied head's weight once
    assert fxslice.report(shrunk)["parameters"]["after"] == before - arch.depth * per_block
    logits = shrunk(example_ids(arch, 2, 6, seed=4))
    assert logits.shape == (2, 6, arch.vocab) and torch.isfinite(logits).all()


class ReluMLP(nn.Module):
    """A biased ReLU MLP with dead channels (always 0) and constant channels (always 1)."""

    def __init__(self, width=6, inner=16, dead=(1, 5, 9), constant=(3, 12)):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(width, inner), nn.Linear(inner, width)
        with torch.no_grad():
            self.up.bias.uniform_(0.5, 1.0)
            for j in dead:
                self.up.weight[j].zero_()
                self.up.bias[j] = -1.0
            for j in constant:
                self.up.weight[j].zero_()
                self.up.bias[j] = 1.0

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


def test_no_mlp_inner_value_is_cached_for_every_batch(monkeypatch):
    # The memory the calibration sweep holds: an MLP's inner values for every batch would be the largest
    # thing it caches (at full width, or at the kept width between the refit and the down projection);
    # they are computed into scratch for the statistics and again within the next segment, a batch at a time.
    from fxslice.calibrate import _Sweep

    arch = Arch(width=16, heads=2, depth=3, mlp=24)
    cached_widths, calls = [], []
    original_init, original_run_until = _Sweep.__init__, _Sweep.run_until

    def init(self, gm, batches, targets):
        original_init(self, gm, batches, targets)
        self.inner_nodes = list(targets)

    def run_until(self, target, *args, **kwargs):
        original_run_until(self, target, *args, **kwargs)
        calls.append(target)
        cached_widths.extend((n.name, env[n].shape[-1]) for env in self.envs for n in self.inner_nodes if n in env)

    monkeypatch.setattr(_Sweep, "__init__", init)
    monkeypatch.setattr(_Sweep, "run_until", run_until)
    shrunk = _compile(TinyLM(arch).double().eval(), [shrink_mlp(0.5, multiple_of=2)], _arch_calibration(arch),
                      (example_ids(arch),))
    assert len(calls) == arch.depth and cached_widths == []  # looked at after each segment
    assert {kept for _, _, kept in fxslice.report(shrunk)["inner"]["mlps"]} == {12}


def test_dead_and_constant_channels_go_first_and_their_removal_is_exact():
    model = ReluMLP().double().eval()
    x = torch.randn(4, 10, 6, dtype=torch.float64)
    calibration = [torch.randn(8, 10, 6, dtype=torch.float64) for _ in range(2)]
    # Five channels carry nothing a bias cannot: dead ones give 0, constant ones a fixed output the
    # refit moves into down's bias.
    shrunk = _compile(model, [shrink_mlp(widths=[11], ridge=1e-9)], calibration, (x,))
    assert relative_error(shrunk(x), model(x)) <= 1e-6
    assert shrunk.get_parameter("down.weight").shape == (6, 11)
    # One channel more and the output must change: the others are independent.
    further = _compile(model, [shrink_mlp(widths=[10], ridge=1e-9)], calibration, (x,))
    assert relative_error(further(x), model(x)) > 1e-3


def _recorded_and_measured_error(shrunk, model, output, calibration) -> tuple[float, float]:
    """The plan's refit error of a one-MLP module, and the same measured: the output's change over the
    calibration tokens over the energy ``output`` (the MLP's product without its bias) has there."""
    ((_, recorded),) = fxslice.report(shrunk)["inner"]["refit_error"]
    with torch.no_grad():
        lost = sum(float((shrunk(c) - model(c)).square().sum()) for c in calibration)
        energy = sum(float(output(c).square().sum()) for c in calibration)
    return recorded, lost / energy


def test_the_plan_records_each_mlps_refit_error_as_measured_on_its_calibration_tokens(tmp_path):
    model = ReluMLP().double().eval()
    x = torch.randn(4, 10, 6, dtype=torch.float64)
    calibration = [torch.randn(8, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                   for s in range(2)]
    def output(c):
        return F.linear(F.relu(model.up(c)), model.down.weight)

    errors = {}
    for width in (16, 11, 10, 4):
        shrunk = _compile(model, [shrink_mlp(widths=[width], ridge=1e-9)], calibration, (x,))
        errors[width], measured = _recorded_and_measured_error(shrunk, model, output, calibration)
        assert errors[width] == pytest.approx(measured, rel=1e-4, abs=1e-9), width
    # Nothing removed, or only channels a bias carries: nothing lost; then more the narrower.
    assert errors[16] == 0.0 and 0 <= errors[11] < 1e-9 and 1e-5 < errors[10] < errors[4] < 1
    fxslice.save(shrunk, tmp_path / "m")
    loaded = fxslice.load(tmp_path / "m", model=model, example_inputs=(x,))
    assert fxslice.report(loaded)["inner"] == fxslice.report(shrunk)["inner"]


def test_the_refit_is_the_least_squares_solution_on_the_kept_channels():
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(200, 12, dtype=torch.float64, generator=generator) @ torch.randn(12, 12, dtype=torch.float64,
                                                                                     generator=generator)
    w = torch.randn(12, 5, dtype=torch.float64, generator=generator)
    c, ridge = h.T @ h, 1e-3
    damped = c + ridge * c.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    # In small blocks the path compacts its inverse several times on the way down to 3 channels.
    for keep, block in ((3, 2), (8, 8)):
        kept, beta = prune_channels(c, w, keep, ridge, block=block)
        # min over β supported on S of (W − β)ᵀ(C + λI)(W − β): β_S = (C+λI)_SS⁻¹ (C+λI)_S: W
        expected = torch.linalg.solve(damped[kept][:, kept], damped[kept] @ w)
        assert kept.numel() == keep and torch.allclose(beta, expected, atol=1e-9, rtol=1e-9)
    # Greedy removal is never worse than a random choice of the same size.
    def error(index, b):
        return float(((h @ w - h[:, index] @ b) ** 2).sum())
    other = torch.randperm(12, generator=generator)[:8].sort().values
    assert error(kept, beta) <= error(other, torch.linalg.solve(damped[other][:, other], damped[other] @ w)) + 1e-9


MLP_PATTERNS = {"llama", "gemma", "phi", "opt", "gpt2"}
"""One of each MLP pattern in the default run (gated SiLU, gated tanh-GELU, GELU with biases, ReLU with
biases, Conv1D weights read by ``addmm``); the other architectures with ``-m slow``."""


@pytest.mark.parametrize("name", [n if n in MLP_PATTERNS else pytest.param(n, marks=pytest.mark.slow) for n in LISTED])
def test_hugging_face_mlps_are_found_and_exact_at_ratio_zero(name):
    model = tiny_model(name, torch.float64)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": ids}]
    shrunk = _compile(model, [shrink_mlp(0.0)], calibration)
    with torch.no_grad():
        assert relative_error(shrunk(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-12
    inner = fxslice.report(shrunk)["inner"]
    assert len(inner["mlps"]) == model.config.num_hidden_layers, inner


def test_save_load_and_cached_decoding_replay_the_inner_widths(tmp_path):
    model = tiny_model("llama", torch.float64)
    model.generation_config.eos_token_id = None
    calibration = [{"input_ids": torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(i))}
                   for i in range(2)]
    shrunk = _compile(model, [fuse_norm, rotate, slice(0.25), shrink_mlp(0.25)], calibration)
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    loaded = _reloads_and_decodes(shrunk, tmp_path / "m", ids, 6)
    assert fxslice.report(loaded)["inner"] == fxslice.report(shrunk)["inner"]
    assert any(d is not None for d in loaded.decoders.values()), "generate did not use the KV-cache graph"


@pytest.mark.parametrize("name", ["gemma2"])  # sandwich post-norms (the tiny zoo all narrow: docs/results.md)
def test_a_budget_the_mlps_cannot_meet_narrows_a_hugging_face_stream_which_load_and_decoding_replay(name, tmp_path):
    model = tiny_model(name)
    model.generation_config.eos_token_id = None
    dense = sum(p.numel() for p in model.parameters())
    calibration = [{"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))}
                   for i in range(2)]
    shrunk = _compile(model, [fuse_norm, rotate, slice(budget=0.2, schedule="sensitivity")], calibration)
    planned, report = plan_of(shrunk).details["budget_plan"], fxslice.report(shrunk)
    assert planned["stream"] < model.config.hidden_size
    assert planned["parameters"] == report["parameters"]["after"] <= 0.2 * dense
    _reloads_and_decodes(shrunk, tmp_path / "m", torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(3)), 3)


class SharedUp(nn.Module):
    """Two MLPs whose up projections share one weight: shrinking one would change the other."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16, bias=False)
        self.down1, self.down2 = nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.down1(F.gelu(self.up(x))) + self.down2(torch.tanh(F.linear(x, self.up.weight)))


def test_an_mlp_whose_weight_is_shared_is_skipped_with_the_reason():
    x = torch.randn(2, 5, 8)
    shrunk = _compile(SharedUp().eval(), [shrink_mlp(0.5)], [x], (x,))
    inner = fxslice.report(shrunk)["inner"]
    assert inner["mlps"] == [] and len(inner["skipped"]) == 2
    assert all("also read by another op" in s for s in inner["skipped"]), inner["skipped"]
    with pytest.raises(UnsupportedGraphError, match="also read by another op"):
        _compile(SharedUp().eval(), [fxslice.ShrinkMLP(ratio=0.5, strict=True)], [x], (x,))


def test_shrink_mlp_needs_calibration_and_valid_options():
    model = TinyLM(Arch()).eval()
    with pytest.raises(UnsupportedGraphError, match="calibration"):
        fxslice.compile(model, [shrink_mlp(0.25)], example_inputs=(example_ids(Arch()),))
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="ratio"):
            shrink_mlp(bad)
    with pytest.raises(ValueError, match="exactly one"):
        shrink_mlp()
    with pytest.raises(ValueError, match="ridge"):
        shrink_mlp(0.25, ridge=0)


@pytest.mark.parametrize("budget", [0.9, 0.75, 0.6])
def test_a_budget_is_met_exactly_and_not_by_more_than_a_step(budget):
    arch = Arch(width=32, heads=4, kv_heads=2, mlp=256, depth=2, vocab=20)
    model = TinyLM(arch).double().eval()
    dense = sum(p.numel() for p in model.parameters())
    shrunk = _compile(model, [slice(budget=budget)], _arch_calibration(arch), (example_ids(arch),))
    report = fxslice.report(shrunk)
    assert report["parameters"]["after"] <= budget * dense
    (kept,) = {k for _, _, k in report["inner"]["mlps"]}
    # One more multiple of 8 in every MLP would break the budget; each channel costs 2 ups + down.
    per_channel = 3 * arch.width * arch.depth
    assert report["parameters"]["after"] + 8 * per_channel > budget * dense
    assert kept % 8 == 0 and report["states"] == []


def test_a_rotate_before_a_budget_rotates_nothing():
    arch = Arch(width=32, heads=4, kv_heads=2, mlp=256, depth=2, vocab=20)
    model = TinyLM(arch).double().eval()
    alone = _compile(model, [fuse_norm, slice(budget=0.8)], _arch_calibration(arch), (example_ids(arch),))
    rotated = _compile(model, [fuse_norm, rotate, slice(budget=0.8)], _arch_calibration(arch), (example_ids(arch),))
    ids = example_ids(arch, 2, 6, seed=4)
    assert torch.equal(alone(ids), rotated(ids))
    assert fxslice.report(rotated)["parameters"] == fxslice.report(alone)["parameters"]
    assert fxslice.report(rotated)["rotation"] is None and fxslice.report(rotated)["states"] == []
    assert "not rotated" in plan_of(rotated).details["rotate"]


def test_a_budget_is_one_of_three_ways_to_size_a_slice():
    with pytest.raises(ValueError, match="exactly one"):
        slice(0.25, budget=0.8)
    with pytest.raises(ValueError, match="budget must be"):
        slice(budget=1.5)
    with pytest.raises(UnsupportedGraphError, match="calibration"):
        fxslice.compile(TinyLM(Arch()).eval(), [slice(budget=0.9)], example_inputs=(example_ids(Arch()),))


def test_a_budget_without_any_mlp_says_what_an_mlp_is():
    arch = Arch(width=32, heads=4, kv_heads=2, depth=2, vocab=20)
    model = TinyLM(arch).eval()
    for block in model.blocks:
        block.mlp = nn.Identity()  # attention only (x + norm2(x): no fuse_norm)
    with pytest.raises(UnsupportedGraphError, match=r"shrinking the 0 MLPs found .*pointwise ops only"):
        _compile(model, [slice(budget=0.75)], _arch_calibration(arch), (example_ids(arch),))


class Experts(GroupedExperts):
    """``GroupedExperts`` on a residual: ``x + experts(x)``."""

    def forward(self, x):
        return x + super().forward(x)


def test_each_expert_keeps_its_own_channels():
    model = Experts().double().eval()
    x = torch.randn(3, 10, 6, dtype=torch.float64)
    calibration = [torch.randn(8, 12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
                   for s in range(2)]
    assert relative_error(_compile(model, [shrink_mlp(0.0)], calibration, (x,))(x), model(x)) <= 1e-12
    # Every expert has two dead channels, each its own pair: keeping 6 of 8 per expert is exact only
    # when each expert chooses for itself.
    shrunk = _compile(model, [shrink_mlp(widths=[6], ridge=1e-9)], calibration, (x,))
    assert relative_error(shrunk(x), model(x)) <= 1e-9
    assert shrunk.get_parameter("gate_up").shape == (3, 12, 6) and shrunk.get_parameter("down").shape == (3, 6, 6)
    further = _compile(model, [shrink_mlp(widths=[5], ridge=1e-9)], calibration, (x,))
    assert relative_error(further(x), model(x)) > 1e-3
    # The refit error sums over the experts, each over its own rows.
    recorded, measured = _recorded_and_measured_error(further, model, super(Experts, model).forward, calibration)
    assert recorded == pytest.approx(measured, rel=1e-4) and recorded > 1e-4
    assert _recorded_and_measured_error(shrunk, model, super(Experts, model).forward, calibration)[0] < 1e-9


@pytest.mark.parametrize("name, schedule", [("phi3", "constant"), ("mixtral", "constant"), ("mixtral", "sensitivity")])
def test_fused_projections_and_experts_meet_a_budget(name, schedule, tmp_path):
    # phi3: gate and up in one linear, chunked in the graph; mixtral: experts as 3-D weights.
    model = tiny_model(name, torch.float32 if name == "mixtral" else torch.float64)
    model.generation_config.eos_token_id = None
    calibration = [{"input_ids": torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(s))}
                   for s in range(2)]
    shrunk = _compile(model, [fuse_norm, slice(budget=0.75, schedule=schedule)], calibration)
    report = fxslice.report(shrunk)
    dense = sum(p.numel() for p in model.parameters())
    assert report["parameters"]["after"] == sum(p.numel() for p in shrunk.parameters()) <= 0.75 * dense
    assert len(report["inner"]["mlps"]) == model.config.num_hidden_layers and not report["inner"]["skipped"]
    _reloads_and_decodes(shrunk, tmp_path / "m", torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3)), 4)


# --------------------------------------------------------------------------- the sensitivity schedule
def test_output_sensitivity_is_the_mean_squared_gradient_of_the_loss_at_each_node():
    arch = Arch(width=16, heads=2, kv_heads=1, mlp=32, depth=3, vocab=20, bias=True)
    model = TinyLM(arch).double().eval()
    batches = check_calibration(_arch_calibration(arch))
    gm = fxslice.capture(model, (example_ids(arch),))
    downs = [m.down.node for m in find_mlps(gm)[0]]
    assert len(downs) == arch.depth
    measured = output_sensitivity(gm, list(batches), downs, progress=False)
    # The same with autograd on the eager model: every sequence's summed next-token loss, on its own.
    squares, outputs = [torch.zeros(arch.width, dtype=torch.float64) for _ in range(arch.depth)], {}
    hooks = [block.mlp.down.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i, block in enumerate(model.blocks)]
    count = 0
    for (ids,), _ in batches:
        for row in ids:
            logits = model(row[None])
            for out in outputs.values():
                out.retain_grad()
            F.cross_entropy(logits[0, :-1], row[1:], reduction="sum").backward()
            for i, out in outputs.items():
                squares[i] += out.grad.square().sum((0, 1))
            count += row.numel()
            model.zero_grad()
    for hook in hooks:
        hook.remove()
    expected = [v / count for v in squares]
    for got, want in zip(measured, expected):
        assert got.shape == (arch.width,)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    # a real check: the layers differ, and so do the features within one
    assert len({round(float(v.sum()), 12) for v in expected}) == arch.depth
    assert all(float(v.max()) > 1.5 * float(v.min()) for v in expected)


class _Recorder:
    """A ``backward_statistics`` watcher keeping every value and gradient it sees, by sequence."""

    def __init__(self):
        self.values, self.grads = {}, {}

    def forward(self, sequence, value, real):
        self.values[sequence] = value.detach().reshape(-1, value.shape[-1]).double()

    def backward(self, sequence, grad):
        self.grads[sequence] = grad.detach().reshape(-1, grad.shape[-1]).double()


def _one_stream(arch: Arch):
    """A float64 TinyLM, its fused graph, its calibration sequences and its stream's one shared state."""
    model = TinyLM(arch).double().eval()
    gm = run_passes(fxslice.capture(model, (example_ids(arch),)), [fuse_norm])
    sequences = first_sequences(list(check_calibration(_arch_calibration(arch))), 10_000)
    (stream,) = [s for r in find_regions(gm, shared=True) for s in r.states]
    return model, gm, sequences, stream


def test_the_streams_loss_is_each_tokens_gradient_times_its_write_in_the_other_folds_directions():
    arch = Arch(width=16, heads=2, kv_heads=1, mlp=32, depth=2, vocab=20)
    model, gm, sequences, stream = _one_stream(arch)
    reads = sorted({n.input for n in stream.norms}, key=list(gm.graph.nodes).index)
    bases = fold_rotations(gm, sequences, reads, 2, progress=False)
    writes = [RotatedSquares(bases) for _ in stream.sources]
    seen = {n: _Recorder() for n in dict.fromkeys([*reads, *(s.node for s in stream.sources)])}
    backward_statistics(gm, sequences, [(s.node, w) for s, w in zip(stream.sources, writes)] + list(seen.items()),
                        progress=False)
    # Fold f's basis: the principal directions of the other fold's norm inputs.
    for f, basis in enumerate(bases):
        h = sum(seen[n].values[i].T @ seen[n].values[i] for n in reads for i in range(len(sequences)) if i % 2 != f)
        eigenvalues = torch.diagonal(basis.T @ h @ basis)
        torch.testing.assert_close(basis.T @ h @ basis, torch.diag(eigenvalues), rtol=0, atol=1e-9 * float(h.norm()))
        assert bool((eigenvalues[:-1] >= eigenvalues[1:] - 1e-9).all())
    assert not torch.allclose(bases[0].abs(), bases[1].abs(), atol=1e-3)
    # Per direction: Σ_t (g_t·q_j)² (y_t·q_j)², each token in its fold's basis.
    for source, write in zip(stream.sources, writes):
        record, want = seen[source.node], 0
        for f, basis in enumerate(bases):
            mine = [i for i in range(len(sequences)) if i % 2 == f]
            grads = torch.cat([record.grads[i] for i in mine]) @ basis
            values = torch.cat([record.values[i] for i in mine]) @ basis
            want = want + (grads.square() * values.square()).sum(0)
        torch.testing.assert_close(write.losses(), want, rtol=1e-10, atol=0)
        assert float(want.max()) > 0


def test_the_projected_loss_is_the_models_loss_and_removes_what_the_writes_lose():
    arch = Arch(width=16, heads=2, kv_heads=1, mlp=32, depth=2, vocab=20)
    model, gm, sequences, stream = _one_stream(arch)
    writes = [s.node for s in stream.sources]
    bases = [random_orthogonal(arch.width, seed) for seed in (0, 1)]
    with torch.no_grad():
        eager = sum(float(F.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="sum"))
                    for (ids,), _ in sequences)
    assert projected_loss(gm, sequences, writes, bases, None) == pytest.approx(eager, rel=1e-12)
    # The backward pass returns the same loss: the plan's baseline, not computed twice.
    assert backward_statistics(gm, sequences, [], progress=False) == pytest.approx(eager, rel=1e-12)
    assert projected_loss(gm, sequences, writes, bases, arch.width) == pytest.approx(eager, rel=1e-12)
    # Nothing kept: the stream is zero, so are the logits, and every token costs log(vocab).
    scored = sum(ids.shape[1] - 1 for (ids,), _ in sequences)
    assert projected_loss(gm, sequences, writes, bases, 0) == pytest.approx(scored * math.log(arch.vocab), rel=1e-9)
    assert eager < projected_loss(gm, sequences, writes, bases, arch.width // 2) != eager


def test_a_budget_after_rotate_narrows_the_stream_where_the_mlps_cannot_pay_and_replays(tmp_path, monkeypatch):
    # A large vocabulary and small MLPs: the embedding's state holds most of the parameters.
    arch = Arch(width=32, heads=4, kv_heads=2, mlp=64, depth=3, vocab=4000)
    model = TinyLM(arch).double().eval()
    dense = sum(p.numel() for p in model.parameters())
    with pytest.raises(UnsupportedGraphError, match="cannot be met by shrinking the 3 MLPs"):
        _compile(model, [fuse_norm, slice(budget=0.75, schedule="sensitivity")], _arch_calibration(arch),
                 (example_ids(arch),))
    # (the module: ``fxslice.passes.shrink_mlp`` is the pass's factory function)
    monkeypatch.setattr(importlib.import_module("fxslice.passes.shrink_mlp"), "STEEP_STREAM_CUT", 0.0)  # every measured cut is steep: warned
    with pytest.warns(UserWarning, match=f"narrows the residual stream from {arch.width} to"):
        shrunk = fxslice.compile(model, [fuse_norm, rotate, slice(budget=0.75, schedule="sensitivity")],
                                 calibration=_arch_calibration(arch), example_inputs=(example_ids(arch),))
    plan, report = plan_of(shrunk), fxslice.report(shrunk)
    planned = plan.details["budget_plan"]
    assert plan.rotation == "shared" and plan.widths == (planned["stream"],) and planned["stream"] < arch.width
    assert planned["stream"] % 8 == 0 and planned["stream_loss"] >= 0
    # The stream's loss at the chosen width was measured, not only estimated.
    assert planned["stream"] in [k for k, _ in planned["measured"]]
    # The planner's count is the model's, and within the budget.
    assert planned["parameters"] == report["parameters"]["after"] == sum(p.numel() for p in shrunk.parameters())
    assert report["parameters"]["after"] <= 0.75 * dense
    assert [[n, k] for n, _, k in report["inner"]["mlps"]] == [list(x) for x in planned["mlps"]]
    # The report holds the estimates the widths were chosen from: the MLPs' losses add up to theirs.
    estimates = report["inner"]["planned"]
    assert estimates["stream"] == planned["stream"] and "mlps" not in estimates
    assert sum(loss for _, loss in estimates["mlp_losses"]) == pytest.approx(planned["mlp_loss"], rel=1e-9)
    fxslice.save(shrunk, tmp_path / "m")
    ids = example_ids(arch, 2, 6, seed=4)
    loaded = fxslice.load(tmp_path / "m", model=TinyLM(arch, seed=7).double().eval(), example_inputs=(example_ids(arch),))
    assert torch.equal(loaded(ids), shrunk(ids))
    assert fxslice.report(loaded)["inner"] == report["inner"]


def test_a_budget_after_rotate_keeps_the_stream_whole_where_the_mlps_pay_less():
    # Wide MLPs and a small vocabulary: narrowing the stream would cost more loss per parameter.
    arch = Arch(width=32, heads=4, kv_heads=2, mlp=128, depth=2, vocab=20)
    model = TinyLM(arch).double().eval()
    dense = sum(p.numel() for p in model.parameters())
    shrunk = _compile(model, [fuse_norm, rotate, slice(budget=0.75, schedule="sensitivity")],
                      _arch_calibration(arch), (example_ids(arch),))
    plan, report = plan_of(shrunk), fxslice.report(shrunk)
    planned = plan.details["budget_plan"]
    assert planned["stream"] == arch.width and planned["stream_loss"] == 0 and plan.details["rotate"] == KEPT_WHOLE
    assert planned["parameters"] == report["parameters"]["after"] <= 0.75 * dense
    # The MLP widths are those the schedule chooses without a rotate.
    alone = _compile(model, [fuse_norm, slice(budget=0.75, schedule="sensitivity")], _arch_calibration(arch),
                     (example_ids(arch),))
    assert report["inner"]["mlps"] == fxslice.report(alone)["inner"]["mlps"]


def test_sweep_folds_split_the_batches_statistics_between_them():
    arch = Arch(width=16, heads=2, kv_heads=1, mlp=32, depth=2, vocab=20)
    model = TinyLM(arch).double().eval()
    gm = fxslice.capture(model, (example_ids(arch),))
    mlps = find_mlps(gm)[0]
    batches = [((example_ids(arch, 1, 5 + b, seed=b),), {}) for b in range(5)]
    seen: dict[int, list] = {}
    inputs = [(m.inner, m.groups, tuple(u.node for u in m.ups)) for m in mlps]
    sweep_inner(gm, batches, inputs, lambda i, s: seen.setdefault(i, [s]), progress=False)
    sweep_inner(gm, batches, inputs, lambda i, *s: seen[i].extend(s), progress=False, folds=2)
    for whole, even, odd in seen.values():
        assert (even.tokens, odd.tokens) == (5 + 7 + 9, 6 + 8) and whole.tokens == even.tokens + odd.tokens
        torch.testing.assert_close(even.h + odd.h, whole.h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(even.sum + odd.sum, whole.sum, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(even.h / even.tokens, odd.h / odd.tokens)


def test_token_weights_weigh_each_tokens_inner_statistics_and_come_from_its_gradient():
    arch = Arch(width=16, heads=2, kv_heads=1, mlp=32, depth=2, vocab=20, bias=True)
    model = TinyLM(arch).double().eval()
    gm = fxslice.capture(model, (example_ids(arch),))
    mlps = find_mlps(gm)[0]
    sequences = [((example_ids(arch, 1, 5 + b, seed=b),), {}) for b in range(5)]
    squares = [FeatureSquares(m.down.node) for m in mlps]
    seen = {m.down.node: _Recorder() for m in mlps}
    backward_statistics(gm, sequences, [(m.down.node, sq) for m, sq in zip(mlps, squares)] + list(seen.items()),
                        progress=False)
    # each row's ‖∂L/∂y‖², y the MLP's output: the squares summed over features, row by row
    for m, sq in zip(mlps, squares):
        for b in range(len(sequences)):
            torch.testing.assert_close(sq.per_row[b], seen[m.down.node].grads[b].square().sum(1), rtol=1e-12, atol=0)
    # the inner values h (what the down projection reads), recorded on the eager model
    inner_values: dict[int, list] = {}
    hooks = [block.mlp.down.register_forward_pre_hook(lambda mod, args, i=i: inner_values.setdefault(i, []).append(args[0]))
             for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        for (ids,), _ in sequences:
            model(ids)
    for hook in hooks:
        hook.remove()
    folds: dict[int, list] = {}
    inputs = [(m.inner, m.groups, tuple(u.node for u in m.ups)) for m in mlps]
    sweep_inner(gm, sequences, inputs, lambda i, *s: folds.setdefault(i, list(s)), progress=False, folds=2,
                row_weights=[sq.per_row for sq in squares])
    for i, parts in folds.items():
        for f, part in enumerate(parts):
            mine = [b for b in range(len(sequences)) if b % 2 == f]
            h = torch.cat([inner_values[i][b].reshape(-1, arch.mlp) for b in mine])
            s = torch.cat([squares[i].per_row[b] for b in mine])
            torch.testing.assert_close(part.weighted, h.T @ (s[:, None] * h), rtol=1e-10, atol=0)
            torch.testing.assert_close(part.weighted_sum, (s[:, None] * h).sum(0), rtol=1e-10, atol=0)
            assert float(part.weighted_tokens) == pytest.approx(float(s.sum()), rel=1e-12)
            torch.testing.assert_close(part.h, h.T @ h, rtol=1e-10, atol=0)  # the fit's sums stay unweighted
            assert float(s.max()) > 2 * float(s.min())  # a real weighting: the tokens' gradients differ


class PostNormMLP(nn.Module):
    """Embedding rows ``10^-spread … 10`` long, a ReLU MLP (``y(c x) = c y(x)``) and a norm of its output: every
    row's length cancels, so the function does not depend on ``spread``. A token's gradient at ``y`` scales
    as ``1 / c``, its MLP's error as ``c``."""

    def __init__(self, spread: float, vocab=64, width=16, inner=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab, bias=False)
        self.up, self.down = nn.Linear(width, inner, bias=False), nn.Linear(inner, width, bias=False)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))
        self.register_buffer("lengths", 10 ** torch.linspace(-spread, 1, vocab)[torch.randperm(vocab)])

    def forward(self, ids):
        y = self.down(F.relu(self.up(self.embed(ids) * self.lengths[ids, None])))
        return self.head(y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-30) * self.weight)


@pytest.mark.parametrize("seed", [0, 1])
def test_an_mlps_loss_behind_a_norm_is_counted_token_by_token(seed):
    generator = torch.Generator().manual_seed(seed)
    calibration = [torch.randint(0, 64, (2, 64), generator=generator) for _ in range(8)]
    planned = {}
    for spread in (0.0, 2.0):
        model = PostNormMLP(spread, seed=seed).double().eval()
        gm = fxslice.capture(model, (calibration[0],))
        planner = fxslice.ShrinkMLP(budget=0.8, schedule="sensitivity", progress=False)
        _, widths, details = planner.plan_widths(gm, find_mlps(gm)[0], 0.8 * sum(p.numel() for p in model.parameters()),
                                                 Context(calibration=tuple(check_calibration(calibration))))
        planned[spread] = widths, details["mlp_loss"], model(calibration[0])
        assert sum(loss for _, loss in details["mlp_losses"]) == pytest.approx(details["mlp_loss"], rel=1e-9)
    (narrow, even, logits), (narrow_spread, spread_loss, spread_logits) = planned.values()
    torch.testing.assert_close(logits, spread_logits, rtol=1e-9, atol=1e-9)  # one function
    assert narrow == narrow_spread == [32] and even > 0
    # Only the refit (least squares over tokens of every length) differs between the two. The product of
    # the mean squared gradient and the mean squared error put the spread one's loss about 100× higher.
    assert 1 / 5 < spread_loss / even < 5


def test_the_error_curve_is_the_refit_error_along_the_removal_path_scored_on_held_out_tokens():
    generator = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 2.0, 24, dtype=torch.float64)
    fit = torch.randn(200, 24, dtype=torch.float64, generator=generator) * scale
    held = torch.randn(150, 24, dtype=torch.float64, generator=generator) * scale.flip(0)
    w = torch.randn(24, 5, dtype=torch.float64, generator=generator)
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    c, t = fit.T @ fit, held.T @ held
    ridge = 1e-2
    in_sample = error_curve(c, w, ridge, points=6)
    held_out = error_curve(c, w, ridge, points=6, test=t, weights=weights)
    assert sorted(held_out, reverse=True) == [24, 20, 16, 12, 8] and held_out[24] == 0.0
    for k in (20, 12, 8):
        kept, beta = prune_channels(c, w, k, ridge, block=4)
        full = torch.zeros_like(w)
        full[kept] = beta
        d = w - full
        assert in_sample[k] == pytest.approx(float((d * (c @ d)).sum()), rel=1e-9)
        assert held_out[k] == pytest.approx(float(((d * (t @ d)).sum(0) * weights).sum()), rel=1e-9)
    assert curve_at(held_out, 14) == pytest.approx((held_out[12] + held_out[16]) / 2)
    assert held_out[8] > held_out[12] > held_out[16] > held_out[20] > 0


def test_sensitive_widths_meet_the_goal_and_keep_more_where_loss_costs_more():
    base = {k: float((64 - k) ** 2) for k in range(0, 65, 8)}
    curves = [base, {k: 100 * v for k, v in base.items()}, base]
    per_channel, now = [10, 10, 10], 10_000
    goal = now - 96 * 10  # 96 channels must go
    widths = sensitive_widths(curves, [64, 64, 64], [32, 32, 32], per_channel, now, goal)
    assert now - sum((64 - k) * 10 for k in widths) <= goal
    # The sensitive MLP keeps more, the two alike keep the same; halfway to the uniform 32 each.
    assert widths[1] > widths[0] == widths[2] and all(k % 8 == 0 for k in widths)
    assert widths == [24, 48, 24]
    with pytest.raises(UnsupportedGraphError, match="cannot meet the budget"):
        sensitive_widths(curves, [64, 64, 64], [8, 8, 8], per_channel, now, 100)


def test_the_sensitivity_schedule_spends_the_budget_unevenly_and_replays(tmp_path):
    arch = Arch(width=32, heads=4, kv_heads=2, mlp=256, depth=3, vocab=20)
    model = TinyLM(arch).double().eval()
    dense = sum(p.numel() for p in model.parameters())
    shrunk = _compile(model, [slice(budget=0.75, schedule="sensitivity")], _arch_calibration(arch),
                      (example_ids(arch),))
    report = fxslice.report(shrunk)
    widths = [k for _, _, k in report["inner"]["mlps"]]
    assert report["parameters"]["after"] == sum(p.numel() for p in shrunk.parameters()) <= 0.75 * dense
    assert len(set(widths)) > 1 and all(k % 8 == 0 for k in widths), widths
    fxslice.save(shrunk, tmp_path / "m")
    ids = example_ids(arch, 2, 6, seed=4)
    loaded = fxslice.load(tmp_path / "m", model=TinyLM(arch, seed=7).double().eval(), example_inputs=(example_ids(arch),))
    assert torch.equal(loaded(ids), shrunk(ids))
    assert fxslice.report(loaded)["inner"] == report["inner"]


def test_the_sensitivity_schedule_spreads_a_budget_only():
    with pytest.raises(ValueError, match="slice\\(budget=…, schedule='sensitivity'\\)"):
        slice(0.25, schedule="sensitivity")
    with pytest.raises(ValueError, match="spends the budget of a ratio"):
        slice(budget=0.75, schedule="spectrum")
    with pytest.raises(ValueError, match="spreads a budget"):
        shrink_mlp(0.25, schedule="sensitivity")
    with pytest.raises(ValueError, match="unknown schedule"):
        shrink_mlp(budget=0.75, schedule="spectrum")
