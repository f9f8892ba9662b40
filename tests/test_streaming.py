"""Streamed compression (fxslice.streaming): a safetensors checkpoint compiled with its weights read as
the passes reach them gives the model the in-memory path gives, and holds a fraction of it in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxslice
from conftest import relative_error
from fxslice import fuse_norm, rotate, slice
from fxslice.errors import UnsupportedGraphError
from fxslice.graph import STREAMED
from fxslice.io import sha256
from fxslice.plan import plan_of

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random llama saved as safetensors shards of at most 100 kB (about 20 files), with its head
    untied and tied to the embedding."""
    from hf_zoo import tiny_model

    directories = {}
    for tied in (False, True):
        model = tiny_model("llama")
        if tied:
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        directories[tied] = tmp_path_factory.mktemp("checkpoint")
        model.save_pretrained(directories[tied], max_shard_size="100KB")
    return directories


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints[False]


def _batches(vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, 24), generator=generator)} for _ in range(3)]


def _both(directory, passes, budget):
    dense = AutoModelForCausalLM.from_pretrained(directory).eval()
    batches = _batches(dense.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_memory = fxslice.compile(dense, passes, calibration=batches)
        streamed = fxslice.compile(str(directory), passes, calibration=batches, stream_budget=budget)
    return dense, in_memory, streamed


@pytest.mark.parametrize("passes, tied", [
    pytest.param([fuse_norm, rotate, slice(0.25)], False, marks=pytest.mark.slow),  # spectrum's case, untied
    ([fuse_norm, rotate, slice(0.25)], True),
    ([fuse_norm, rotate, slice(0.3, schedule="spectrum")], False),
    ([fuse_norm, slice(budget=0.85)], True),
], ids=["constant", "constant-tied", "spectrum", "budget-tied"])
def test_a_streamed_checkpoint_compresses_to_the_in_memory_model(checkpoints, passes, tied, tmp_path):
    # 60 kB of weights in memory: far less than the model (about 2 MB), so weights are evicted and
    # rewritten ones spill to disk and are read back.
    dense, in_memory, streamed = _both(checkpoints[tied], passes, budget=60_000)
    store = streamed.graph_module.meta[STREAMED]
    assert store.spilled > 0 and store.reads > len(store.files)
    assert plan_of(streamed) == plan_of(in_memory)
    assert streamed.graph_module.code == in_memory.graph_module.code
    assert fxslice.report(streamed)["parameters"] == fxslice.report(in_memory)["parameters"]

    fxslice.save(streamed, tmp_path / "streamed")
    shards = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ids = torch.randint(0, dense.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = in_memory(ids).logits
        assert relative_error(fxslice.load(tmp_path / "streamed")(ids).logits, expected) <= 1e-6
        assert relative_error(streamed(ids).logits, expected) <= 1e-6  # calling it reads its weights in
    assert STREAMED not in streamed.graph_module.meta


def test_within_its_budget_a_streamed_model_saves_the_same_bytes(checkpoint, tmp_path):
    _, in_memory, streamed = _both(checkpoint, [fuse_norm, rotate, slice(0.25)], budget=2**30)
    assert streamed.graph_module.meta[STREAMED].spilled == 0
    fxslice.save(in_memory, tmp_path / "a")
    fxslice.save(streamed, tmp_path / "b")
    assert sha256(tmp_path / "a" / "model.safetensors") == sha256(tmp_path / "b" / "model.safetensors")


def test_a_damaged_checkpoint_is_refused_naming_the_file(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (broken / victim).unlink()
    with pytest.raises(UnsupportedGraphError, match=victim):
        fxslice.compile(str(broken), [fuse_norm, rotate, slice(0.25)], calibration=_batches(128))
    shutil.copy(checkpoint / victim, broken / victim)
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedGraphError, match="layers.1.mlp.down_proj.weight"):
        fxslice.compile(str(broken), [fuse_norm, rotate, slice(0.25)], calibration=_batches(128))
    with pytest.raises(UnsupportedGraphError, match="not a Hugging Face safetensors checkpoint"):
        fxslice.compile(str(tmp_path / "nothing-here"), [fuse_norm, rotate, slice(0.25)], calibration=_batches(128))



def test_the_sensitivity_schedule_refuses_a_streamed_checkpoint(checkpoint):
    # Its backward pass would need every weight of the model at once.
    with pytest.raises(UnsupportedGraphError, match="streamed from disk never holds"):
        fxslice.compile(str(checkpoint), [slice(budget=0.85, schedule="sensitivity")], calibration=_batches(128))


MEASURE = """
import json, sys, warnings, torch
warnings.simplefilter("ignore")
import fxslice
from fxslice import fuse_norm, rotate, slice
sys.path.insert(0, sys.argv[4])
from streaming import warm_up

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

directory, budget = sys.argv[1], int(sys.argv[2])
vocab = json.load(open(directory + "/config.json"))["vocab_size"]
generator = torch.Generator().manual_seed(0)
batches = [{"input_ids": torch.randint(0, vocab, (1, 64), generator=generator)} for _ in range(2)]
warm_up()  # what a first compile imports is the process's own
baseline = status("VmRSS")
sliced = fxslice.compile(directory, [fuse_norm, rotate, slice(0.25)], calibration=batches, stream_budget=budget)
fxslice.save(sliced, sys.argv[3])
print(json.dumps({"gained": status("VmHWM") - baseline, "store_peak": sliced.graph_module.meta["fxslice.streamed"].peak}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_streamed_compression_holds_a_fraction_of_the_checkpoint_in_memory(tmp_path):
    from synthetic_checkpoint import write_checkpoint

    size = write_checkpoint(tmp_path / "checkpoint", layers=8, hidden=1024, intermediate=2816, heads=8, kv_heads=4,
                            vocab=8192)
    budget = 32 * 1024**2
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "checkpoint"), str(budget), str(tmp_path / "out"),
                          BENCHMARKS],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    # The store keeps its budget, or the one tensor in use when that is larger (the embedding, 32 MiB).
    assert measured["store_peak"] <= budget + 8192 * 1024 * 4
    # Peak resident memory above the process's after imports: the in-memory path needs the checkpoint
    # and more; streamed, the budget, the tensors being rewritten (float64), the graph's Python objects.
    assert measured["gained"] <= 0.5 * size, (measured, size)
    saved = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert 0.5 * size < saved < size


def test_a_checkpoint_streams_in_bfloat16_as_it_loads_in_bfloat16(checkpoint, tmp_path):
    passes = [fuse_norm, rotate, slice(0.25)]
    dense = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    batches = _batches(dense.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_memory = fxslice.compile(dense, passes, calibration=batches)
        streamed = fxslice.compile(str(checkpoint), passes, calibration=batches, stream_budget=60_000,
                                   dtype=torch.bfloat16, device="cpu")
    fxslice.save(streamed, tmp_path / "bf16")
    loaded = fxslice.load(tmp_path / "bf16", device="cpu")
    assert loaded.dtype == torch.bfloat16
    ids = torch.randint(0, dense.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
    with pytest.raises(ValueError, match="move a model in memory"):
        fxslice.compile(dense, passes, calibration=batches, dtype=torch.float16)


def test_a_model_saved_from_another_device_is_rebuilt_on_this_one(checkpoint, tmp_path):
    # Saved as if compressed on another device (the recipe names it, the fingerprint reads the code as
    # naming it): load captures on the CPU and compares the graphs in the saved device's terms.
    dense = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    sliced = fxslice.compile(dense, [fuse_norm, rotate, slice(0.25)], calibration=_batches(dense.config.vocab_size))
    fxslice.save(sliced, tmp_path / "saved")
    recipe_path = tmp_path / "saved" / "fxslice.json"
    recipe = json.loads(recipe_path.read_text())
    assert recipe["device"] == "cpu"
    recipe["device"], recipe["fingerprint"] = "cuda:0", fxslice.io.fingerprint(sliced.graph_module, device="cuda:0")
    assert recipe["fingerprint"] != fxslice.io.fingerprint(sliced.graph_module)
    recipe_path.write_text(json.dumps(recipe))
    ids = torch.arange(3, 15).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(fxslice.load(tmp_path / "saved")(ids).logits, sliced(ids).logits)
    recipe["fingerprint"] = "0" * 64  # traced otherwise there: the saved logits decide (test_io) ...
    del recipe["probe"]  # ... and a recipe without them is refused
    recipe_path.write_text(json.dumps(recipe))
    with pytest.raises(UnsupportedGraphError, match="compressed on cuda:0 and rebuilt on cpu"):
        fxslice.load(tmp_path / "saved")


def test_a_streamed_model_heals_like_any_other(checkpoint):
    dense, _, streamed = _both(checkpoint, [fuse_norm, rotate, slice(0.25)], budget=60_000)
    batches = _batches(dense.config.vocab_size, seed=1)
    healed = fxslice.heal(streamed, teacher=dense, data=batches, steps=2, eval_every=1, progress=False)
    assert healed.heal_history[-1]["step"] == 2
    assert plan_of(healed) == plan_of(streamed)
