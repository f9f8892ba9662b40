"""save / load: safetensors + JSON recipe, atomic writes, bitwise-identical reload in a fresh process."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import fxslice
from conftest import same_threads
from fxslice import UnsupportedGraphError, fuse_norm, rotate, slice
from fxslice.plan import plan_of
from hf_zoo import tiny_model
from strategies import Arch, TinyLM, example_ids

CALIBRATION = [{"input_ids": torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(i))} for i in range(2)]
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("gpt2")  # LayerNorm, tied head, Conv1D: the most rewriting
    compiled = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=CALIBRATION)
    directory = tmp_path_factory.mktemp("saved") / "model"
    fxslice.save(compiled, directory)
    torch.save(compiled(input_ids=IDS).logits, directory.parent / "logits.pt")  # reference for the child process
    return compiled, directory


def test_directory_holds_weights_recipe_and_config_and_no_pickle(saved):
    _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "fxslice.json", "model.safetensors"]
    recipe = json.loads((directory / "fxslice.json").read_text())
    plan = recipe["plan"]
    assert [p["name"] for p in plan["passes"]] == ["fuse_norm", "rotate", "slice"]
    assert len(plan["states"]) == 9 and plan["kind"] == "causal_lm" and len(recipe["fingerprint"]) == 64
    assert not list(directory.parent.glob(".model.partial-*")), "a staging directory was left behind"


def test_reload_in_a_fresh_process_is_bitwise_identical_without_calibration(saved):
    _, directory = saved
    code = same_threads() + textwrap.dedent(f"""
        import torch, fxslice
        model = fxslice.load({str(directory)!r})
        ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(5))
        assert torch.equal(model(input_ids=ids).logits, torch.load({str(directory.parent / 'logits.pt')!r}))
        assert fxslice.report(model)["rotation"]["q"] == "pca"
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-2000:]


def test_loaded_model_reports_the_same(saved):
    compiled, directory = saved
    loaded = fxslice.load(directory)
    assert fxslice.report(loaded)["states"] == fxslice.report(compiled)["states"]
    assert fxslice.report(loaded)["parameters"] == fxslice.report(compiled)["parameters"]
    assert plan_of(loaded.graph_module) == plan_of(compiled.graph_module)


def test_the_same_model_saves_to_the_same_bytes(saved, tmp_path):
    compiled, directory = saved
    recorded = json.loads((directory / "fxslice.json").read_text())["sha256"]
    for attempt in range(6):  # a file whose header order varied between writes would differ within a few
        fxslice.save(compiled, tmp_path / str(attempt))
        assert json.loads((tmp_path / str(attempt) / "fxslice.json").read_text())["sha256"] == recorded


def test_existing_directory_is_kept_unless_overwrite(saved, tmp_path):
    compiled, _ = saved
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        fxslice.save(compiled, target)
    assert (target / "keep.txt").read_text() == "mine"
    fxslice.save(compiled, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "fxslice.json").exists()


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    compiled, _ = saved
    import fxslice.io

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fxslice.io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fxslice.save(compiled, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]), "model.safetensors"),
    (lambda d: (d / "fxslice.json").write_text("{not json"), "fxslice.json is corrupted"),
    (lambda d: (d / "fxslice.json").unlink(), "fxslice.json is missing"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32})), "differs|config"),
])
def test_damaged_directories_name_the_file(saved, tmp_path, damage, message):
    import shutil

    _, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    damage(copy)
    with pytest.raises(UnsupportedGraphError, match=message):
        fxslice.load(copy)


def _recipe_edited(saved, tmp_path, **changes):
    import shutil

    _, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    recipe = json.loads((copy / "fxslice.json").read_text())
    recipe.update({key: change(recipe) for key, change in changes.items()})
    (copy / "fxslice.json").write_text(json.dumps(recipe))
    return copy


# As if saved on a GPU, where the model code traced to other operations: the code's fingerprint differs.
ON_A_GPU = {"device": lambda r: "cuda:0", "fingerprint": lambda r: "0" * 64}


def test_a_model_saved_on_another_device_loads_where_its_weights_fit_and_its_logits_agree(saved, tmp_path):
    compiled, _ = saved
    loaded = fxslice.load(_recipe_edited(saved, tmp_path, **ON_A_GPU))
    assert torch.equal(loaded(input_ids=IDS).logits, compiled(input_ids=IDS).logits)


@pytest.mark.parametrize("change, message", [
    ({"probe": lambda r: [[[x + 1.0 for x in row] for row in rows] for rows in r["probe"]]}, "logits differ"),
    ({"tensors": lambda r: "0" * 64}, "fingerprint mismatch"),
    ({"device": lambda r: "cpu"}, "fingerprint mismatch"),  # on its own device the code must be the same
], ids=["other logits", "other tensors", "same device"])
def test_a_model_saved_on_another_device_is_refused_when_it_computes_otherwise(saved, tmp_path, change, message):
    with pytest.raises(UnsupportedGraphError, match=message):
        fxslice.load(_recipe_edited(saved, tmp_path, **{**ON_A_GPU, **change}))


def test_plain_module_needs_its_class_to_load(tmp_path):
    arch = Arch(width=32, heads=4, depth=2, tied=True)
    model = TinyLM(arch).eval()
    compiled = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], example_inputs=(example_ids(arch),))
    fxslice.save(compiled, tmp_path / "m")
    with pytest.raises(UnsupportedGraphError, match="pass model="):
        fxslice.load(tmp_path / "m")
    loaded = fxslice.load(tmp_path / "m", model=TinyLM(arch, seed=7), example_inputs=(example_ids(arch),))
    ids = example_ids(arch, 3, 5, seed=2)
    assert torch.equal(loaded(ids), compiled(ids))


class SharedBlockLM(torch.nn.Module):
    """One MLP block run in two layers, each reaching it through an RMS norm of its own (Zamba's shared
    transformer): the two norms' γ hold equal values (ones) but are two parameters."""

    def __init__(self, width=16, vocab=50):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(width) for _ in range(2))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 32), torch.nn.GELU(), torch.nn.Linear(32, width))
        self.final = torch.nn.RMSNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for norm in self.norms:
            x = x + self.mlp(norm(x))
        return self.head(self.final(x))


def test_a_rebuild_whose_weights_are_not_yet_its_own_replays_the_saved_graph(tmp_path):
    # load replays the passes on a model whose weights are uninitialised (whatever memory held): a
    # decision made on the norms' values (fold equal γ once into the shared block) would come out
    # otherwise there and the rebuilt graph would differ.
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    compiled = fxslice.compile(SharedBlockLM().double().eval(), [fuse_norm, rotate], example_inputs=(ids,))
    fxslice.save(compiled, tmp_path / "m")
    rebuilt = SharedBlockLM().double().eval()
    with torch.no_grad():
        rebuilt.norms[1].weight.mul_(2.0)
    loaded = fxslice.load(tmp_path / "m", model=rebuilt, example_inputs=(ids,))
    assert torch.equal(loaded(ids), compiled(ids))


class ConstantLM(TinyLM):
    """A tensor made inside forward: torch.export lifts it into a plain graph attribute (``lifted_tensor_0``),
    neither parameter nor buffer, which load must set back as what it is."""

    def forward(self, input_ids):
        return super().forward(input_ids) * torch.tensor(0.5)


def test_a_constant_lifted_from_the_model_code_saves_and_loads(tmp_path):
    arch = Arch(width=32, heads=4, depth=2)
    compiled = fxslice.compile(ConstantLM(arch).eval(), [fuse_norm, rotate, slice(0.25)],
                               example_inputs=(example_ids(arch),))
    assert any(name.startswith("lifted_tensor") for name in vars(compiled) if not name.startswith("_"))
    fxslice.save(compiled, tmp_path / "m")
    loaded = fxslice.load(tmp_path / "m", model=ConstantLM(arch, seed=7), example_inputs=(example_ids(arch),))
    ids = example_ids(arch, 3, 5, seed=2)
    assert torch.equal(loaded(ids), compiled(ids))


def test_a_corrupted_weights_file_is_refused_by_its_checksum(saved, tmp_path):
    import shutil

    compiled, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    weights = copy / "model.safetensors"
    recipe = json.loads((copy / "fxslice.json").read_text())
    assert len(recipe["sha256"]["model.safetensors"]) == 64
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    weights.write_bytes(bytes(data))
    with pytest.raises(UnsupportedGraphError, match="sha256"):
        fxslice.load(copy)
    loaded = fxslice.load(copy, verify=False)  # the file's own structure is intact: it loads, wrongly
    assert not torch.equal(loaded(input_ids=IDS).logits, compiled(input_ids=IDS).logits)


def test_a_model_built_from_a_text_config_that_no_causal_lm_maps_saves_and_loads(tmp_path):
    import zoo_configs
    from transformers import AutoModelForCausalLM

    model = zoo_configs.tiny_model("emu3").to(torch.float64)  # Emu3ForCausalLM on Emu3TextConfig
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_config(model.config)  # what load alone would build it from
    compiled = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=CALIBRATION)
    fxslice.save(compiled, tmp_path / "m")
    assert model.config.architectures is None, "save must not write into the user's config"
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == [type(model).__name__]
    loaded = fxslice.load(tmp_path / "m")
    assert torch.equal(loaded(input_ids=IDS).logits, compiled(input_ids=IDS).logits)
    compiled.generate(IDS, max_new_tokens=2, do_sample=False)  # its decoding graph is built from the plan's class
    assert [d for d in compiled.decoders.values() if d is not None]
