"""On a CUDA device: compile, slice, save / load, KV-cache generate, streaming and heal compute where the
model is, and agree with the CPU. Skipped where no GPU is present (CI has none)."""

import warnings

import pytest
import torch

import fxslice
from conftest import relative_error
from fxslice import fuse_norm, rotate, slice
from hf_zoo import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def batches(count=2, rows=4, length=24, vocab=100, seed=100):
    return [{"input_ids": torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed + i))}
            for i in range(count)]


def compiled(model, passes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxslice.compile(model, list(passes), calibration=batches())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.cpu()


IDS = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(5))


def test_rotation_on_cuda_is_exact_in_float64():
    dense = tiny_model("llama", torch.float64).to(CUDA)
    fused, rotated = compiled(dense, [fuse_norm]), compiled(dense, [fuse_norm, rotate])
    assert all(p.device.type == "cuda" for p in rotated.parameters())
    assert relative_error(logits(rotated, IDS), logits(fused, IDS)) < 1e-10
    assert relative_error(logits(fused, IDS), logits(dense, IDS)) < 1e-6  # the norm written out, as on the CPU


@pytest.mark.parametrize("passes", [
    [fuse_norm, rotate, slice(0.25)],
    [fuse_norm, rotate, slice(0.25, schedule="readers")],
    [fuse_norm, slice(budget=0.85)],
], ids=["constant", "readers", "budget"])
def test_slicing_on_cuda_gives_the_cpu_model_in_float64(passes):
    # The statistics and their eigenvectors come from another library on each device (cuSOLVER, LAPACK):
    # a basis vector may flip sign, which Q and Qᵀ undo together, so the models agree to rounding.
    on_cpu = compiled(tiny_model("llama", torch.float64), passes)
    on_cuda = compiled(tiny_model("llama", torch.float64).to(CUDA), passes)
    assert fxslice.report(on_cuda)["parameters"] == fxslice.report(on_cpu)["parameters"]
    assert relative_error(logits(on_cuda, IDS), logits(on_cpu, IDS)) < 1e-8


def test_bfloat16_slicing_on_cuda_costs_about_what_float32_does():
    # float64 statistics of bfloat16 activations: the sliced model's distance to its own dense model is
    # what float32 gives, up to bfloat16's rounding of the logits (a fraction of slicing's error).
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        dense = tiny_model("llama").to(CUDA, dtype)
        sliced = compiled(dense, [fuse_norm, rotate, slice(0.25)])
        assert {p.dtype for p in sliced.parameters()} == {dtype}
        errors[dtype] = relative_error(logits(sliced, IDS), logits(dense, IDS))
    assert errors[torch.bfloat16] < 1.25 * errors[torch.float32] + 0.02, errors


def test_a_model_sliced_on_cuda_generates_there_and_loads_on_the_cpu(tmp_path):
    model = tiny_model("llama", torch.float64).to(CUDA)
    model.generation_config.eos_token_id = None  # generate the full length
    sliced = compiled(model, [fuse_norm, rotate, slice(0.25)])
    prompt = IDS[:1, :6].to(CUDA)
    out = sliced.generate(prompt, max_new_tokens=8, do_sample=False)
    chain = prompt
    for _ in range(8):  # greedy decoding is the argmax chain of the model's own logits
        chain = torch.cat([chain, sliced(input_ids=chain).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.device.type == "cuda" and torch.equal(out, chain)
    assert any(d is not None for d in sliced.decoders.values()), "generate did not use the KV-cache graph"
    fxslice.save(sliced, tmp_path / "sliced")
    loaded = fxslice.load(tmp_path / "sliced")
    assert next(loaded.parameters()).device.type == "cpu"
    assert relative_error(logits(loaded, IDS), logits(sliced, IDS)) < 1e-10
    on_cuda = fxslice.load(tmp_path / "sliced", device="cuda")
    assert torch.equal(logits(on_cuda, IDS), logits(sliced, IDS))


def test_a_checkpoint_streams_onto_cuda(tmp_path):
    model = tiny_model("llama", torch.float64)
    model.save_pretrained(tmp_path / "checkpoint", max_shard_size="100KB")
    passes = [fuse_norm, rotate, slice(0.25)]
    in_memory = compiled(model, passes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = fxslice.compile(str(tmp_path / "checkpoint"), passes, calibration=batches(),
                                   dtype=torch.float64, device="cuda", stream_budget=60_000)
    assert relative_error(logits(streamed, IDS), logits(in_memory, IDS)) < 1e-8


@pytest.mark.parametrize("options", [{}, {"autocast": torch.bfloat16}, {"lora_rank": 4, "lr": 3e-3}],
                         ids=["float32", "autocast", "lora"])
def test_heal_trains_on_cuda(options):
    teacher = tiny_model("llama").to(CUDA)
    student = compiled(teacher, [fuse_norm, rotate, slice(0.5)])
    data = batches(6, seed=0)
    healed = fxslice.heal(student, teacher, data, steps=8, warmup=0, validation=data, eval_every=4,
                          progress=False, **{"lr": 3e-4, **options})
    losses = [h["validation"] for h in healed.heal_history if "validation" in h]
    # On the CPU, 8 steps take the KL to 0.66x (adapters: 0.79x): training, not only running, on the device.
    assert losses[-1] < 0.9 * losses[0], f"validation KL {losses}"
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in healed.parameters())
