"""One compression plan: ``compile``, ``run_passes`` and torch's ``PassManager`` build the same model and the
same plan; the plan round-trips through JSON; a pass that needs calibration says how to give it before
anything changes."""

import json
import warnings

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager

import fxslice
from fxslice import Rotate, UnsupportedGraphError, fuse_norm, rotate, slice
from fxslice.passes import calibrated, run_passes
from fxslice.plan import Plan, plan_of
from hf_zoo import tiny_model
from strategies import Arch, TinyLM, example_ids

ARCH = Arch(width=32, heads=4, kv_heads=2, depth=2, norm="layer", bias=True, tied=True, learned_pos=True)
EXAMPLE = (example_ids(ARCH, 2, 7),)
CALIBRATION = [{"input_ids": example_ids(ARCH, 4, 12, seed=10 + i)} for i in range(3)]

PIPELINES = {
    "random per-state": ([fuse_norm, rotate, slice(0.25)], None),
    "random shared": ([fuse_norm, Rotate(shared=True), slice(0.25)], None),
    "pca per-state": ([fuse_norm, rotate, slice(0.25)], CALIBRATION),
    "pca shared": ([fuse_norm, Rotate(shared=True), slice(0.25)], CALIBRATION),
    "pca spectrum": ([fuse_norm, rotate, slice(0.25, schedule="spectrum")], CALIBRATION),
    "pca widths": ([fuse_norm, rotate, slice(widths=lambda i, d: d - 8 * (i % 2))], CALIBRATION),
}


def three_ways(model, passes, calibration, example=EXAMPLE):
    """The same passes and data through compile, run_passes and torch's PassManager."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxslice.compile(model, passes, example_inputs=example, calibration=calibration)
        piped = run_passes(fxslice.capture(model, example), passes, calibration=calibration)
        managed = fxslice.capture(model, example)
        if calibration is None:
            managed = PassManager(passes)(managed).graph_module
        else:
            with calibrated(managed, calibration, passes):
                managed = PassManager(passes)(managed).graph_module
    return compiled, piped, managed


@pytest.mark.parametrize("name", PIPELINES)
def test_compile_run_passes_and_pass_manager_build_the_same_model(name):
    passes, calibration = PIPELINES[name]
    model = TinyLM(ARCH).double().eval()
    models = three_ways(model, passes, calibration)
    ids = example_ids(ARCH, 3, 9, seed=4)
    with torch.no_grad():
        logits = [m(ids) for m in models]
    assert all(torch.equal(logits[0], other) for other in logits[1:])
    plans = [plan_of(m) for m in models]
    assert plans[0] == plans[1] == plans[2]
    assert plans[0].applied == ("fuse_norm", "rotate", "slice")
    assert plans[0].rotation == ("shared" if "shared" in name else "per_state")
    assert {s.q for s in plans[0].states} == {"pca" if calibration else "random"}
    assert all(s.kept is not None and s.kept <= s.width for s in plans[0].states)
    assert any(s.kept < s.width for s in plans[0].states)


def test_a_causal_lm_through_run_passes_equals_compile():
    model = tiny_model("llama", torch.float64)
    data = [{"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    passes = [fuse_norm, rotate, slice(0.25)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxslice.compile(model, passes, calibration=data)
        piped = run_passes(fxslice.capture(model), passes, calibration=data)
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids, attention_mask=mask).logits,
                           piped(input_ids=ids, attention_mask=mask).logits)
    assert plan_of(compiled.graph_module) == plan_of(piped)


def test_the_plan_round_trips_through_json_and_records_resolved_widths():
    passes, calibration = PIPELINES["pca widths"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxslice.compile(TinyLM(ARCH).double().eval(), passes, example_inputs=EXAMPLE, calibration=calibration)
    plan = plan_of(gm)
    assert Plan.from_json(json.loads(plan.dumps())) == plan
    widths = plan.passes[-1].kwargs["widths"]
    assert widths == [s.kept for s in plan.states] == [s.width - 8 * (s.state % 2) for s in plan.states]
    assert fxslice.report(gm)["passes"][-1]["widths"] == widths


def test_a_pass_that_needs_calibration_says_how_to_give_it_before_anything_changes():
    passes = [fuse_norm, rotate, slice(0.25, schedule="spectrum")]
    gm = fxslice.capture(TinyLM(ARCH).double().eval(), EXAMPLE)
    code = gm.code
    with pytest.raises(UnsupportedGraphError, match=r"calibration=batches.*calibrated\(gm, batches, passes\)"):
        run_passes(gm, passes)
    with pytest.raises(UnsupportedGraphError, match="calibration=batches"):
        fxslice.compile(TinyLM(ARCH).double().eval(), passes, example_inputs=EXAMPLE)
    assert gm.code == code and plan_of(gm).passes == ()
    # Under PassManager the slice pass itself refuses, before it changes anything.
    with pytest.raises(Exception) as raised:
        PassManager(passes[2:])(run_passes(gm, passes[:2]))
    assert "calibrated(gm, batches, passes)" in str(raised.value.__cause__)
    assert plan_of(gm).applied == ("fuse_norm", "rotate")


def test_the_calibration_context_is_gone_after_the_pipeline():
    gm = run_passes(fxslice.capture(TinyLM(ARCH).double().eval(), EXAMPLE), [fuse_norm, rotate], calibration=CALIBRATION)
    assert "fxslice.context" not in gm.meta
    assert {s.q for s in plan_of(gm).states} == {"pca"} and all(s.kept is None for s in plan_of(gm).states)


@pytest.mark.parametrize("name", ["pca spectrum", "pca widths"])
def test_a_saved_plan_replays_without_calibration(name, tmp_path):
    passes, calibration = PIPELINES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxslice.compile(TinyLM(ARCH).double().eval(), passes, example_inputs=EXAMPLE, calibration=calibration)
        fxslice.save(gm, tmp_path / "m")
        loaded = fxslice.load(tmp_path / "m", model=TinyLM(ARCH, seed=7).double().eval(), example_inputs=EXAMPLE)
    ids = example_ids(ARCH, 3, 9, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(ids), gm(ids))
    assert plan_of(loaded) == plan_of(gm)
