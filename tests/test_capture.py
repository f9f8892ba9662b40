"""capture: any module + example inputs -> an ATen GraphModule with the same call signature and outputs."""

import pytest
import torch
from torch import nn

import fxslice
from conftest import relative_error
from fxslice import CaptureError
from fxslice.passes import run_passes
from strategies import Arch, TinyLM, example_ids


class DictModel(nn.Module):
    """Nested inputs and outputs: flattened and rebuilt by the graph's own pytree code."""

    def __init__(self):
        super().__init__()
        self.lm = TinyLM(Arch())

    def forward(self, batch):
        logits = self.lm(batch["ids"])
        return {"logits": logits, "extra": (logits.sum(-1),)}


def test_plain_module_with_positional_inputs_runs_at_new_shapes():
    model = TinyLM(Arch()).eval()
    gm = fxslice.capture(model, (example_ids(Arch(), 2, 6),))
    assert isinstance(gm, torch.fx.GraphModule)
    for batch, length in [(1, 3), (4, 11)]:
        ids = example_ids(Arch(), batch, length, seed=5)
        assert relative_error(gm(ids), model(ids)) <= 1e-6


def test_nested_inputs_and_outputs_keep_their_structure():
    model = DictModel().eval()
    gm = fxslice.capture(model, ({"ids": example_ids(Arch(), 2, 6)},))
    ids = example_ids(Arch(), 3, 9, seed=2)
    out, ref = gm({"ids": ids}), model({"ids": ids})
    assert set(out) == {"logits", "extra"} and isinstance(out["extra"], tuple)
    assert relative_error(out["logits"], ref["logits"]) <= 1e-6


def test_capture_uses_eval_mode_and_restores_training_mode():
    model = TinyLM(Arch()).train()
    fxslice.capture(model, (example_ids(Arch(), 2, 6),))
    assert model.training


def test_ops_are_aten_and_dtype_asserts_are_gone():
    gm = fxslice.capture(TinyLM(Arch()), (example_ids(Arch(), 2, 6),))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in targets and "aten.embedding.default" in targets
    assert not [t for t in targets if "_assert_tensor_metadata" in t]


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor's value cannot be exported
            return self.linear(x)
        return x


def test_untraceable_model_names_the_model_and_what_to_try():
    with pytest.raises(CaptureError, match=r"DataDependent.*What to try"):
        fxslice.capture(DataDependent(), (torch.randn(2, 3, 4),))


def test_plain_module_without_example_inputs_is_rejected():
    with pytest.raises(CaptureError, match="example_inputs"):
        fxslice.capture(TinyLM(Arch()))


def test_non_module_is_rejected():
    with pytest.raises(CaptureError, match="nn.Module"):
        fxslice.capture(lambda x: x, (torch.zeros(1),))


class _ScanOverTokens(torch.nn.Module):
    """A running sum written as a Python loop over the tokens: the capture is specialised to one length."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.mix = torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.mix(self.norm(x))
        total, outs = torch.zeros_like(h[:, 0]), []
        for t in range(x.shape[1]):
            total = total + h[:, t]
            outs.append(total)
        return x + torch.stack(outs, 1)


def test_calibration_at_a_length_the_specialised_graph_refuses_says_so_before_anything_changes():
    from fxslice.capture import refusal

    gm = fxslice.capture(_ScanOverTokens(), (torch.randn(2, 6, 8),))
    assert refusal(gm, (torch.randn(3, 6, 8),)) is None
    assert "Guard failed" in refusal(gm, (torch.randn(2, 7, 8),))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(fxslice.CalibrationError, match=r"batch 1 \(shapes \[\(2, 7, 8\)\]\).*specialised"):
        run_passes(gm, [fxslice.fuse_norm, fxslice.rotate], calibration=[(torch.randn(2, 6, 8),), (torch.randn(2, 7, 8),)])
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


class _MaskFromAValue(nn.Module):
    """A size read from an input's value (``.item()``, as a cache's fill level is): a data-dependent symbol."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.norm, self.final = nn.LayerNorm(8), nn.LayerNorm(8)
        self.mix, self.head = nn.Linear(8, 8), nn.Linear(8, 50)

    def forward(self, ids, filled):
        n = filled.item()
        torch._check(n >= 0)
        x = self.embed(ids)
        x = x + self.mix(self.norm(x)) * (torch.arange(ids.shape[1]) < n)[None, :, None]
        return self.head(self.final(x))


def test_a_size_read_from_a_value_keeps_the_passes_exact():
    model = _MaskFromAValue().double()
    ids, filled = torch.randint(0, 50, (2, 6)), torch.tensor(4)
    gm = fxslice.capture(model, (ids, filled))
    assert any("unbacked_bindings" in n.meta for n in gm.graph.nodes)
    out = run_passes(gm, [fxslice.fuse_norm, fxslice.rotate])(ids, filled)
    assert relative_error(out, model(ids, filled)) < 1e-12
