"""Memory known before a job starts: the calibration estimate, and a refusal before anything changes."""

import pytest
import torch

import fxslice
from fxslice import fuse_norm, rotate, slice
from fxslice.capture import capture
from fxslice.errors import CalibrationError
from fxslice.memory import MAX_MEMORY_ENV, available_bytes, calibration_estimate, value_bytes
from hf_zoo import tiny_model


def batches(count, length=32, rows=2):
    return [((), {"input_ids": torch.randint(0, 100, (rows, length), generator=torch.Generator().manual_seed(i)),
                  "attention_mask": torch.ones(rows, length, dtype=torch.long)}) for i in range(count)]


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, capture(model)


def test_values_are_measured_on_fake_tensors_with_the_batch_shapes(llama):
    model, gm = llama
    (args, kwargs), = batches(1, length=40, rows=3)
    sizes = value_bytes(gm, args, kwargs)
    logits = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes[0]
    assert sizes[logits] == 3 * 40 * model.config.vocab_size * 4


def test_cached_activations_grow_with_the_batches_and_hold_at_least_the_stream(llama):
    model, gm = llama
    one, four = (calibration_estimate(gm, batches(n)) for n in (1, 4))
    assert four["cached"] == 4 * one["cached"] and four["batch"] == one["batch"]
    stream = 2 * 32 * model.config.hidden_size * 4  # the residual stream of one batch, float32
    assert stream <= one["cached"] <= one["batch"]
    longer = calibration_estimate(gm, batches(1, length=128))
    assert longer["batch"] >= 4 * one["batch"] and longer["cached"] == 4 * one["cached"]
    assert one["statistics"] >= 8 * model.config.intermediate_size ** 2


def test_a_backward_pass_adds_one_sequences_values_beyond_the_sweeps(llama):
    model, gm = llama
    (args, kwargs), = batches(1, length=128, rows=2)
    alone, backward = (calibration_estimate(gm, [(args, kwargs)], backward=b) for b in (False, True))
    assert "backward" not in alone and {k: v for k, v in backward.items() if k != "backward"} == alone
    sizes = value_bytes(gm, args, kwargs)
    # At least the logits and every linear's output of one sequence, less what the sweep holds anyway.
    linears = sum(v for n, v in sizes.items() if n.op == "call_function" and "linear" in str(n.target)) // 2
    assert backward["backward"] >= linears - alone["cached"] - alone["batch"] - alone["statistics"] > 0
    assert backward["backward"] < sum(sizes.values()) // 2


def test_a_job_that_cannot_fit_is_refused_before_the_model_changes(monkeypatch):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setenv(MAX_MEMORY_ENV, "0.0001")
    with pytest.raises(CalibrationError, match=r"needs an estimated .* GiB is available: use fewer or shorter"):
        fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=[b[1] for b in batches(2)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    monkeypatch.setenv(MAX_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_MEMORY_ENV):
        available_bytes()


def test_the_machine_reports_what_is_available(monkeypatch):
    monkeypatch.delenv(MAX_MEMORY_ENV, raising=False)
    free = available_bytes()
    assert free is None or free > 0


def test_cached_activations_that_would_not_fit_wait_on_disk_and_give_the_same_model(monkeypatch, capsys):
    model = tiny_model("llama").double()
    data = batches(4)
    passes = [fuse_norm, rotate, slice(0.25)]
    in_memory = fxslice.compile(model, passes, calibration=[b[1] for b in data])
    estimate = calibration_estimate(capture(model), data)
    on_disk = sum(estimate.values()) - estimate["cached"] + estimate["cached"] // len(data)
    # Room for everything but the cache of all four batches: one batch's at a time must do.
    monkeypatch.setenv(MAX_MEMORY_ENV, str((on_disk + sum(estimate.values())) / 2 / 1024**3))
    saved = []

    def counting_save(obj, path, *args, **kwargs):
        saved.append(path)
        return original(obj, path, *args, **kwargs)

    original = torch.save
    monkeypatch.setattr(torch, "save", counting_save)
    capsys.readouterr()
    spilled = fxslice.compile(model, passes, calibration=[b[1] for b in data])
    assert "with the cached activations on disk" in capsys.readouterr().err
    assert len({str(p) for p in saved}) == len(data) and len(saved) > 9 * len(data)  # every batch, every state
    ids = batches(1, length=9)[0][1]["input_ids"]
    with torch.no_grad():
        assert torch.equal(spilled(ids).logits, in_memory(ids).logits)
