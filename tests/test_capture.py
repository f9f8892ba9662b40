"""capture: any module + example inputs -> an ATen GraphModule with the same call signature and outputs."""

import pytest
import torch
from torch import nn

import fxslice
from conftest import relative_error
from fxslice import CaptureError
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
