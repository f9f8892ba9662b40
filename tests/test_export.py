"""fxslice.export: torch.export programs that run with torch alone, and standard Hugging Face checkpoints."""

import json
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import fxslice
from conftest import same_threads
from fxslice import Rotate, fuse_norm, rotate, slice
from fxslice.errors import UnsupportedGraphError
from hf_zoo import tiny_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
CALIBRATION = [{"input_ids": torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(i))} for i in range(2)]
# Run in a fresh interpreter where importing fxslice fails, so the exported files must stand alone.
WITHOUT_FXSLICE = "import sys; sys.modules['fxslice'] = None\n"


def compress(name="llama", dtype=torch.float32, passes=(fuse_norm, rotate, slice(0.25)), tie=None):
    model = tiny_model(name, dtype)
    if tie is not None:
        from transformers import AutoModelForCausalLM

        model.config.tie_word_embeddings = tie
        model = AutoModelForCausalLM.from_config(model.config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, fxslice.compile(model, list(passes), calibration=CALIBRATION)


def run_alone(code: str, *, block_transformers: bool = True) -> str:
    blocked = WITHOUT_FXSLICE + ("sys.modules['transformers'] = None\n" if block_transformers else "")
    blocked += same_threads()
    result = subprocess.run([sys.executable, "-c", blocked + code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A sliced tiny llama saved, loaded back with fxslice.load and exported from there."""
    _, sliced = compress()
    root = tmp_path_factory.mktemp("export")
    fxslice.save(sliced, root / "saved")
    loaded = fxslice.load(root / "saved")
    fxslice.export(loaded, root / "pt2", cache_len=64, progress=False)
    return loaded, root


def test_prefill_program_runs_with_torch_alone_and_gives_the_loaded_models_logits_bitwise(exported):
    loaded, root = exported
    ids = torch.randint(0, 128, (3, 13), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    torch.save({"ids": ids, "mask": mask}, root / "inputs.pt")
    run_alone(f"""
import torch
inputs = torch.load({str(root / 'inputs.pt')!r})
with torch.no_grad():
    logits = torch.export.load({str(root / 'pt2' / 'prefill.pt2')!r}).module()(inputs["ids"], inputs["mask"])
torch.save(logits, {str(root / 'logits.pt')!r})
""")
    with torch.no_grad():
        expected = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(torch.load(root / "logits.pt"), expected)


def test_greedy_generation_from_the_decode_program_equals_generate(exported):
    loaded, root = exported
    prompt = [5, 17, 3, 99, 42]
    out = run_alone(f"""
import sys; sys.path.insert(0, "examples")
import generate_pt2
generate_pt2.main([{str(root / 'pt2')!r}, "--ids", "{','.join(map(str, prompt))}", "--max-new-tokens", "12"])
""")
    ids = [int(i) for i in out.strip().splitlines()[0].split(",")]
    expected = loaded.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert ids == expected[0].tolist()


def test_manifest_records_the_calling_convention_and_every_files_sha256(exported):
    _, root = exported
    manifest = json.loads((root / "pt2" / "manifest.json").read_text())
    assert manifest["decode"]["cache_len"] == 64 and manifest["decode"]["batch_size"] == 1
    assert set(manifest["sha256"]) == {"prefill.pt2", "decode.pt2", "README.md"}
    assert manifest["max_relative_error"] == {"prefill": 0.0, "decode": 0.0}
    (root / "corrupt").mkdir()
    for name in manifest["sha256"]:
        data = bytearray((root / "pt2" / name).read_bytes())
        if name == "decode.pt2":
            data[len(data) // 2] ^= 0xFF
        (root / "corrupt" / name).write_bytes(bytes(data))
    (root / "corrupt" / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "examples/generate_pt2.py", str(root / "corrupt"), "--ids", "1,2"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "decode.pt2 does not have the sha256" in result.stderr


def test_export_refuses_bad_input_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model, sliced = compress()
    with pytest.raises(UnsupportedGraphError, match="causal LM compressed by fxslice"):
        fxslice.export(model, tmp_path / "a")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fxslice.export(sliced, tmp_path / "exists")
    with pytest.raises(ValueError, match="format"):
        fxslice.export(sliced, tmp_path / "b", format="onnx")
    import fxslice.portable as portable

    def broken(*args, **kwargs):
        raise RuntimeError("the exported decoding step does not reproduce the model")

    monkeypatch.setattr(portable, "_check_decode", broken)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        fxslice.export(sliced, tmp_path / "c", cache_len=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


SHARED = (fuse_norm, Rotate(shared=True), slice(0.25))
BUDGET = (fuse_norm, slice(budget=0.9))


@pytest.mark.parametrize("name,tie,passes,hidden,untied", [
    # llama untied is qwen3's case (untied head) without its q/k norms: with -m slow only
    pytest.param("llama", False, SHARED, 48, True, marks=pytest.mark.slow), ("llama", True, SHARED, 48, True),
    ("qwen3", None, SHARED, 48, True), ("llama", True, BUDGET, 64, False), ("qwen2", None, BUDGET, 64, False)])
def test_the_original_architecture_at_smaller_sizes_loads_without_fxslice(name, tie, passes, hidden, untied, tmp_path):
    model, sliced = compress(name, torch.float64, passes, tie=tie)
    fxslice.export(sliced, tmp_path / "hf", format="hf")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))
    torch.save(ids, tmp_path / "ids.pt")
    run_alone(f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, dtype=torch.float64).eval()
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
print(model.config.hidden_size, model.config.tie_word_embeddings)
""", block_transformers=False)
    with torch.no_grad():
        expected = sliced(input_ids=ids).logits
    logits = torch.load(tmp_path / "logits.pt")
    # transformers computes its norms in float32 even in a float64 model
    assert ((logits - expected).abs().max() / expected.abs().max()) < 1e-5
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    assert config["hidden_size"] == hidden and config["head_dim"] == head_dim  # heads keep their width
    inner = {after for _, _, after in (fxslice.report(sliced)["inner"] or {"mlps": [("", 0, 128)]})["mlps"]}
    assert [config["intermediate_size"]] == sorted(inner)
    # A tied head reads fuse_norm's bridge diag(γ): rotated, it is folded into an untied head; unrotated, γ
    # goes back into the final norm and the head stays tied.
    assert config["tie_word_embeddings"] is (False if untied else bool(model.config.tie_word_embeddings))


@pytest.mark.parametrize("name,passes,reason", [
    ("llama", (fuse_norm, rotate, slice(0.25)), "rotated per state"),
    ("phi", (fuse_norm, Rotate(shared=True), slice(0.25)), "a norm that is not RMS"),
    ("llama", (fuse_norm, fxslice.shrink_mlp(widths=[64, 96, 64, 64])), "one MLP width"),
])
def test_a_model_that_is_not_the_original_architecture_is_refused_with_the_reason(name, passes, reason, tmp_path):
    _, compressed = compress(name, torch.float64, passes)
    with pytest.raises(UnsupportedGraphError, match=reason):
        fxslice.export(compressed, tmp_path / "hf", format="hf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_aoti_packages_reproduce_the_programs(tmp_path):
    _, sliced = compress()
    fxslice.export(sliced, tmp_path / "pt2", cache_len=32, compiled=True, progress=False)
    manifest = json.loads((tmp_path / "pt2" / "manifest.json").read_text())
    assert manifest["compiled"] == {"prefill_aoti": "prefill.aoti.pt2", "decode_aoti": "decode.aoti.pt2"}
    assert max(manifest["max_relative_error"].values()) < 1e-4
    out = run_alone(f"""
import sys; sys.path.insert(0, "examples")
import generate_pt2
generate_pt2.main([{str(tmp_path / 'pt2')!r}, "--ids", "3,4,5", "--max-new-tokens", "8", "--compiled"])
""")
    ids = [int(i) for i in out.strip().splitlines()[0].split(",")]
    assert ids == sliced.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=8, do_sample=False)[0].tolist()
