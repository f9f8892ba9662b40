"""Calibration: PCA rotations are exact at slice(0), sequential (each state's final activations are
decorrelated), mask-aware, dtype-agnostic; bad calibration input fails before any work."""

import warnings

import pytest
import torch
from datasets import Dataset
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

import fxslice
from conftest import relative_error
from fxslice import CalibrationError, Rotate, fuse_norm, rotate, slice
from fxslice.calibrate import (RESCALE_EXPONENT, PCARotation, _FoldCovariances, check_calibration, first_tokens,
                               gram, lost_fraction, pca)
from fxslice.graph import flat_inputs
from fxslice.passes.rotate import ROTATED_STATE
from hf_zoo import tiny_model
from strategies import Arch, TinyLM, example_ids

ARCH = Arch(width=32, heads=4, kv_heads=2, depth=2, norm="layer", bias=True, tied=True, learned_pos=True)


def batches(arch=ARCH, n=3, batch=4, length=12):
    return [{"input_ids": example_ids(arch, batch, length, seed=10 + i)} for i in range(n)]


def compile_quietly(model, passes, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslice.compile(model, passes, **kwargs)


@pytest.mark.parametrize("passes", [[fuse_norm, rotate, slice(0.0)], [fuse_norm, Rotate(shared=True)]], ids=["per-state", "shared"])
def test_pca_rotation_without_slicing_is_exact(passes):
    model = TinyLM(ARCH).double().eval()
    compiled = compile_quietly(model, passes, example_inputs=(example_ids(ARCH),), calibration=batches())
    ids = example_ids(ARCH, 3, 9, seed=99)
    assert relative_error(compiled(ids), model(ids)) <= 1e-9
    report = fxslice.report(compiled)
    assert report["rotation"]["q"] == "pca"
    assert all(s["kept_variance"] == pytest.approx(1.0) for s in report["states"])


def anchor_values(gm, data):
    """The value at every rotated state's anchor, per calibration batch, in the final model."""
    anchors = {n: n.meta[ROTATED_STATE]["index"] for n in gm.graph.nodes if ROTATED_STATE in n.meta}
    seen = {i: [] for i in anchors.values()}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in anchors:
                seen[anchors[n]].append(out.detach())
            return out

    for batch in data:
        Recorder(gm).run(*flat_inputs(gm, (), batch))
    return seen


def test_calibration_is_sequential_each_final_state_is_decorrelated():
    # If every state's Q came from the activations of the model as it finally is (earlier states
    # already rotated and sliced), the final activations at each state are exactly decorrelated with
    # descending variances: QₖᵀHQₖ = diag(λ₁ … λₖ).
    model = TinyLM(ARCH).double().eval()
    data = batches()
    compiled = compile_quietly(model, [fuse_norm, rotate, slice(0.25)], example_inputs=(example_ids(ARCH),),
                               calibration=data)
    values = anchor_values(compiled, data)
    assert len(values) == 5
    for index, xs in values.items():
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in xs]).double()
        h = x.T @ x
        diagonal = torch.diagonal(h)
        assert h.shape[0] == 24 or index in (0, 4)  # the head's states keep their width
        if index == 0 and h.shape[0] < ARCH.width:
            continue  # narrowed, its Q also serves the tied head (test_the_state_a_tied_head_reads_is_rotated_for_both…)
        off = (h - torch.diag(diagonal)).abs().max()
        assert off <= 1e-8 * diagonal.max(), f"state {index}: off-diagonal {off:.3g} vs {diagonal.max():.3g}"
        assert torch.all(diagonal[:-1] >= diagonal[1:] * (1 - 1e-9)), f"state {index}: variances not descending"


def test_padding_tokens_do_not_change_the_rotation():
    model = tiny_model("llama", torch.float64)
    # Enough real tokens (8 × 40) for a full-rank covariance of width 64, so the PCA is well defined.
    ids = torch.randint(0, 100, (8, 40), generator=torch.Generator().manual_seed(1))
    plain = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    junk = torch.randint(0, 100, (8, 6), generator=torch.Generator().manual_seed(2))
    padded_ids = torch.cat([ids, junk], dim=1)  # right padding: causal attention keeps real tokens intact
    padded = [{"input_ids": padded_ids, "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros_like(junk)], 1)}]
    test = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(3))
    a = compile_quietly(model, [fuse_norm, rotate, slice(0.25)], calibration=plain)(input_ids=test).logits
    b = compile_quietly(model, [fuse_norm, rotate, slice(0.25)], calibration=padded)(input_ids=test).logits
    assert relative_error(b, a) <= 1e-6
    unmasked = [{"input_ids": padded_ids}]
    c = compile_quietly(model, [fuse_norm, rotate, slice(0.25)], calibration=unmasked)(input_ids=test).logits
    assert relative_error(c, a) > 1e-3, "the junk tokens should change the rotation when they are not masked"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_models_calibrate(dtype):
    model = tiny_model("llama", dtype)
    data = [{"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    exact = compile_quietly(model, [fuse_norm, rotate, slice(0.0)], calibration=data)
    sliced = compile_quietly(model, [fuse_norm, rotate, slice(0.25)], calibration=data)
    test = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(9))
    reference = model(input_ids=test).logits
    out = exact(input_ids=test).logits
    assert out.dtype == dtype and torch.isfinite(sliced(input_ids=test).logits).all()
    assert relative_error(out, reference) <= (1e-4 if dtype == torch.float32 else 5e-2)
    assert next(sliced.graph_module.parameters()).dtype == dtype


def test_dataset_and_dataloader_calibration_give_the_same_result():
    model = TinyLM(ARCH).double().eval()
    data = batches(n=2)
    rows = torch.cat([b["input_ids"] for b in data])
    dataset = Dataset.from_dict({"input_ids": rows.tolist()})
    loader = DataLoader([{"input_ids": r} for r in rows], batch_size=4)
    ids = example_ids(ARCH, 2, 5, seed=7)
    results = [compile_quietly(model, [fuse_norm, rotate, slice(0.25)], example_inputs=(example_ids(ARCH),),
                               calibration=c)(ids) for c in (data, dataset, loader)]
    assert relative_error(results[1], results[0]) <= 1e-9 and relative_error(results[2], results[0]) <= 1e-9


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "empty"),
        ([{"ids": torch.zeros(2, 4, dtype=torch.long)}], "keys"),
        ([{"input_ids": torch.zeros(4, dtype=torch.long)}], "2-D integer"),
        ([{"input_ids": torch.zeros(2, 4)}], "2-D integer"),
        ([{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.full((2, 4), float("nan"))}], "NaN"),
        ([{"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}], "does not match"),
        ("some text", "calibration_batches"),
    ],
)
def test_bad_calibration_fails_before_any_work(bad, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match=message):
        fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_plain_module_batches_are_checked_against_its_signature():
    with pytest.raises(CalibrationError, match="does not match"):
        check_calibration([{"tokens": torch.zeros(1, 2, dtype=torch.long)}], TinyLM(ARCH))
    assert check_calibration([example_ids(ARCH)], TinyLM(ARCH))[0][0][0].shape == (2, 7)


@given(st.integers(1, 40), st.integers(1, 30), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_gram_by_block_rows_is_x_transpose_x(n, d, blocks, seed):
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(gram(x, blocks), x.T @ x, rtol=1e-12, atol=1e-12)


def test_first_tokens_cuts_the_last_batch_it_needs_to_whole_rows():
    data = [((), {"input_ids": torch.arange(48).reshape(4, 12) + 100 * i, "attention_mask": torch.ones(4, 12)})
            for i in range(3)]
    taken = first_tokens(data, 60)  # 48 tokens of the first batch, then one row (12 tokens) of the second
    assert [b[1]["input_ids"].shape for b in taken] == [(4, 12), (1, 12)]
    assert taken[1][1]["attention_mask"].shape == (1, 12)
    assert torch.equal(taken[1][1]["input_ids"], data[1][1]["input_ids"][:1])
    assert [b[1]["input_ids"].shape[0] for b in first_tokens(data, 97)] == [4, 4, 1]
    assert len(first_tokens(data, 10**6)) == 3 and first_tokens(data, 48)[0] is data[0]


@pytest.mark.parametrize("schedule, loss_at", [("spectrum", "stream"), ("readers", "readers")])
def test_a_planned_schedule_keeps_the_budget_and_the_head_states(monkeypatch, schedule, loss_at):
    asked = []
    measure = PCARotation.losses

    def spy(self, gm, states, tokens=4096, **kwargs):
        asked.append(kwargs.get("at", "stream"))
        return measure(self, gm, states, tokens, **kwargs)

    monkeypatch.setattr(PCARotation, "losses", spy)
    model = TinyLM(Arch(width=64, heads=4, depth=3, tied=True)).eval()
    data = [{"input_ids": example_ids(Arch(), 8, 32, seed=s)} for s in range(2)]
    results = {}
    for name in ("constant", schedule):
        # head=False: at this size, keeping the head's states whole would not shrink the model, which the
        # default (head=None) avoids by slicing them too.
        compiled = compile_quietly(model, [fuse_norm, rotate, slice(0.25, schedule=name, head=False)],
                                   example_inputs=(example_ids(Arch()),), calibration=data)
        results[name] = fxslice.report(compiled)
    assert asked == [loss_at]  # the planner measured the loss its schedule names, once
    assert results[schedule]["parameters"]["after"] <= results["constant"]["parameters"]["after"]
    widths = [s["width_after"] for s in results[schedule]["states"]]
    assert widths[0] == widths[-1] == 64  # the embedding and the final state feed the (tied) head
    assert all(w % 8 == 0 and 8 <= w <= 64 for w in widths)
    with pytest.raises(ValueError, match=f"schedule='{schedule}' spends the budget of a ratio"):
        slice(widths=[8], schedule=schedule)


def test_spectrum_pre_pass_skipping_the_identity_skip_matrices_changes_nothing(monkeypatch):
    import fxslice.calibrate as calibrate
    from fxslice.analysis.regions import SKIP_EDGE
    from fxslice.graph import get_tensor

    model = TinyLM(Arch(width=64, heads=4, depth=3, tied=True)).eval()
    data = [{"input_ids": example_ids(Arch(), 8, 32, seed=s)} for s in range(2)]
    seen = {}
    original = calibrate.PCARotation.losses

    def record(self, gm, states, *args, **kwargs):
        skips = [n for n in gm.graph.nodes if n.meta.get(SKIP_EDGE)]
        seen.setdefault("identities", []).append(sum(calibrate._is_identity(get_tensor(gm, n.args[1].target))
                                                     for n in skips))
        seen.setdefault("losses", []).append(original(self, gm, states, *args, **kwargs))
        return seen["losses"][-1]

    monkeypatch.setattr(calibrate.PCARotation, "losses", record)
    reports = []
    for bypass in (True, False):
        if not bypass:
            monkeypatch.setattr(calibrate, "_is_identity", lambda weight: False)
        compiled = compile_quietly(model, [fuse_norm, rotate, slice(0.25, schedule="spectrum")],
                                   example_inputs=(example_ids(Arch()),), calibration=data)
        reports.append([s["width_after"] for s in fxslice.report(compiled)["states"]])
    assert seen["identities"] == [6, 0]  # 3 blocks, 2 skips each: bypassed in the first run only
    fast, slow = seen["losses"]
    assert len(fast) == len(slow) == len(reports[0]) and reports[0] == reports[1]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


def test_fold_covariances_split_real_tokens_by_sequence_across_batches():
    xs = [torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)]
    masks = [torch.ones(3, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)]
    masks[1][0, 3:] = 0  # sequence 3 (odd) has two padding tokens
    folds = _FoldCovariances(masks, 2)
    for b, x in enumerate(xs):
        folds(b, x)
    sequences = [xs[0][0], xs[0][1], xs[0][2], xs[1][0, :3], xs[1][1]]  # real tokens, sequences 0-4
    for i in (0, 1):
        rows = torch.cat(sequences[i::2])
        unit = rows / rows.norm(dim=-1, keepdim=True)
        assert torch.allclose(folds.h[i], rows.T @ rows) and torch.allclose(folds.unit[i], unit.T @ unit)
    assert folds.tokens == [15, 8] and folds.sequences == 5


def test_held_out_loss_sees_what_a_few_tokens_do_not_span():
    # 24 tokens in 64 dimensions with a flat spectrum: fitted and measured on the same tokens, 24
    # directions lose nothing; on tokens the fit has not seen they lose about 1 − 24/64 of each token.
    generator = torch.Generator().manual_seed(0)
    fit, held = (torch.randn(24, 64, generator=generator, dtype=torch.float64) for _ in range(2))

    def unit_gram(x):
        x = x / x.norm(dim=-1, keepdim=True)
        return x.T @ x

    in_sample = lost_fraction(fit.T @ fit, unit_gram(fit))
    held_out = lost_fraction(fit.T @ fit, unit_gram(held))
    assert in_sample[0] == held_out[0] == 1 and in_sample[24] < 1e-9 and held_out[64] < 1e-9
    assert 0.5 < held_out[24] < 0.75
    assert bool((held_out[1:] <= held_out[:-1] + 1e-12).all())


def test_loss_at_the_readers_counts_a_huge_direction_only_as_much_as_they_use_it():
    # Direction 0 holds almost all of every token's length; the readers' weights ignore it.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=generator, dtype=torch.float64)
    x[:, 0] = 100.0 + x[:, 0]
    unit = x / x.norm(dim=-1, keepdim=True)
    w = torch.randn(16, 24, generator=generator, dtype=torch.float64)
    w[0] = 0.0
    stream = lost_fraction(x.T @ x, unit.T @ unit)
    readers = lost_fraction(x.T @ x, unit.T @ unit, reads=w @ w.T)
    assert stream[1] < 0.01 and readers[1] > 0.9  # keeping the huge direction alone keeps what is read of nothing
    # Against the definition, for every k: the fraction of ‖x̂ W‖² lost when x̂ keeps k principal directions.
    _, q = pca(x.T @ x)
    for k in range(17):
        drop = q[:, k:] @ q[:, k:].T
        assert torch.isclose(readers[k], ((unit @ drop @ w) ** 2).sum() / ((unit @ w) ** 2).sum(), atol=1e-12)
    # Read by the identity, the loss is the fraction of the stream's length.
    assert torch.allclose(lost_fraction(x.T @ x, unit.T @ unit, reads=torch.eye(16, dtype=torch.float64)), stream)


def test_spectrum_schedule_without_calibration_is_an_error():
    with pytest.raises(fxslice.UnsupportedGraphError, match="calibration"):
        compile_quietly(TinyLM(ARCH), [fuse_norm, rotate, slice(0.25, schedule="spectrum")],
                        example_inputs=(example_ids(ARCH),))


def test_rescale_multiplies_the_first_sliced_states_normed_sinks_by_its_gain():
    # State 0 (embedding, read by the tied head) keeps its width (head=False), so state 1 is the first sliced and
    # gets the same Q with or without rescaling. Its norm's sinks (block 0's MLP) differ by exactly the
    # reported gain, and the gain is mean(r)^-RESCALE_EXPONENT with r = ‖x Q_k‖ / ‖x‖ per token, measured from
    # the final activations of an unsliced (‖x Q‖ = ‖x‖) and a sliced compilation.
    model = TinyLM(ARCH).double().eval()
    data = batches()
    compiled = {name: compile_quietly(model, [fuse_norm, rotate, s], example_inputs=(example_ids(ARCH),), calibration=data)
                for name, s in [("full", slice(0.0)), ("plain", slice(0.25, rescale=False, head=False)),
                                ("rescaled", slice(0.25, head=False))]}
    states = fxslice.report(compiled["rescaled"])["states"]
    assert [s["state"] for s in states if "norm_gain" in s] == [1, 2, 3]  # the sliced ones
    assert all("norm_gain" not in s for s in fxslice.report(compiled["plain"])["states"])
    full, sliced = anchor_values(compiled["full"], data)[1], anchor_values(compiled["plain"], data)[1]
    r = torch.cat([(s.norm(dim=-1) / f.norm(dim=-1)).reshape(-1) for s, f in zip(sliced, full)])
    gain = states[1]["norm_gain"]
    assert gain == pytest.approx(float(r.mean()) ** -RESCALE_EXPONENT, rel=1e-9)
    assert gain > 1.0
    plain, rescaled = compiled["plain"].state_dict(), compiled["rescaled"].state_dict()
    for name in [n for n in plain if n.endswith(("blocks.0.mlp.up.weight", "blocks.0.mlp.gate.weight"))] or [None]:
        assert name is not None, sorted(plain)
        torch.testing.assert_close(rescaled[name], gain * plain[name], rtol=1e-12, atol=0)
    upstream = [n for n in plain if ".blocks.0.attn." in "." + n]
    assert upstream
    for name in upstream:
        torch.testing.assert_close(rescaled[name], plain[name], rtol=0, atol=0)  # upstream of state 1


def test_rescale_leaves_the_output_head_alone():
    # With head=True the final state is sliced too. Its norm feeds only the tied head (through a bridge
    # and the centring correction), where a gain would only change the logits' temperature: no gain.
    model = TinyLM(ARCH).double().eval()
    compiled = compile_quietly(model, [fuse_norm, rotate, slice(0.25, head=True)], example_inputs=(example_ids(ARCH),),
                               calibration=batches())
    states = fxslice.report(compiled)["states"]
    assert all(s["width_after"] < s["width_before"] for s in states)
    assert [s["state"] for s in states if "norm_gain" in s] == [0, 1, 2, 3]


class AssembledMLP(torch.nn.Module):
    """An MLP whose hidden activation is assembled in place, the way latent attention builds its keys: a
    buffer (here NaN-filled, so an unwritten one shows) whose two halves are copied in. The copies have no
    users in the graph; the calibration sweep must still run them."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        hidden = self.mlp.up(x)
        half = hidden.shape[-1] // 2
        assembled = torch.full_like(hidden, float("nan"))
        assembled[..., :half].copy_(torch.nn.functional.gelu(hidden[..., :half]))
        assembled[..., half:].copy_(torch.tanh(hidden[..., half:]))
        return self.mlp.down(assembled)


def test_calibration_runs_in_place_writes_that_have_no_users():
    arch = Arch(width=32, heads=4, depth=2)
    model = TinyLM(arch).eval()
    for block in model.blocks:
        block.mlp = AssembledMLP(block.mlp)
    data = [{"input_ids": example_ids(arch, 4, 12, seed=i)} for i in range(2)]
    sliced = compile_quietly(model, [fuse_norm, rotate, slice(0.25)], example_inputs=(example_ids(arch),),
                             calibration=data)
    ids = example_ids(arch, 3, 9, seed=99)
    assert torch.isfinite(sliced(ids)).all()
    kept = [s["kept_variance"] for s in fxslice.report(sliced)["states"]]
    assert all(0.5 < k <= 1.0 for k in kept), kept


@pytest.mark.parametrize("passes", [[fuse_norm, rotate, slice(0.25)], [fxslice.shrink_mlp(0.5, multiple_of=2)]],
                         ids=["residual sweep", "inner sweep"])
def test_the_sweep_holds_no_value_past_its_last_reader(monkeypatch, passes):
    # A batch's segment runs like a plain forward: what no later node reads is dropped as soon as its last
    # reader has run (an MLP's inner values, attention's scores), not when the segment ends; the memory
    # estimate (fxslice.memory) assumes exactly this.
    from fxslice.calibrate import _Sweep

    held, runs = [], []
    original = _Sweep._run

    def run(self, node, env):
        if node in self.position:
            runs.append(node)
            here = self.position[node]
            held.extend(n.name for n in env if n.op != "placeholder" and self.last_use.get(n, -1) < here)
        return original(self, node, env)

    monkeypatch.setattr(_Sweep, "_run", run)
    arch = Arch(width=16, heads=2, depth=3, mlp=24)
    compile_quietly(TinyLM(arch).double().eval(), passes, example_inputs=(example_ids(arch),),
                    calibration=batches(arch, n=2))
    assert len(runs) > 50 and held == []


def test_padded_tokens_are_left_out_of_every_copy_of_a_stream_held_side_by_side():
    # Hyper-connections hold [batch, tokens, copies, d]: each real token gives one row per copy, and
    # every copy of a padded token is left out, as a padded token is for a [batch, tokens, d] stream.
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    covariances = _FoldCovariances([mask], folds=1)
    covariances(0, x)
    real = torch.cat([x[0, :3].reshape(-1, 4), x[1].reshape(-1, 4)])
    assert covariances.tokens[0] == real.shape[0] == 24
    torch.testing.assert_close(covariances.h[0], real.T @ real, rtol=1e-12, atol=1e-12)


def test_the_state_a_tied_head_reads_is_rotated_for_both_of_its_readers(monkeypatch):
    # The embedding's state is read by the first block and, through the bridge fuse_norm puts in front of
    # the tied head, by the head: its Q is the PCA of both covariances, each over its trace.
    import fxslice.calibrate as calibrate

    arch = Arch(tied=True, depth=2)
    model = TinyLM(arch).double().eval()
    batches = [example_ids(arch, 4, 9, seed=s) for s in (10, 11)]
    received, pca = [], calibrate.pca
    monkeypatch.setattr(calibrate, "pca", lambda h: (received.append(h), pca(h))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25, head=True)], calibration=batches,
                                 example_inputs=(example_ids(arch),))
    embedded, read = [], []
    hooks = [model.embed.register_forward_hook(lambda m, a, out: embedded.append(out.reshape(-1, arch.width))),
             model.final_norm.register_forward_hook(lambda m, a, out: read.append(out.reshape(-1, arch.width)))]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for hook in hooks:
        hook.remove()
    x, z = torch.cat(embedded), torch.cat(read)
    expected = x.T @ x / (x.T @ x).trace() + z.T @ z / (z.T @ z).trace()
    assert len(received) == 2 * arch.depth + 1  # every state once
    torch.testing.assert_close(received[0], expected, rtol=1e-10, atol=1e-12)
    assert fxslice.report(sliced)["states"][0]["width_after"] == 8
    # Kept whole (the default for a head's states), any Q is exact: its own PCA, and no pre-pass for the head.
    received.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=batches,
                               example_inputs=(example_ids(arch),))
    assert fxslice.report(kept)["states"][0]["width_after"] == arch.width
    torch.testing.assert_close(received[0], x.T @ x, rtol=1e-10, atol=1e-10)
