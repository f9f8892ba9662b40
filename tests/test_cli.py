"""The command line: slice, eval, generate, inspect; bad input is one line on stderr and nothing written."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

VALID = pathlib.Path(__file__).resolve().parent.parent / "data" / "wikitext-2" / "valid.txt"


def command(*args, check=True):
    """``python -m fxslice …`` as a command (the module fixture below runs one this way)."""
    result = subprocess.run([sys.executable, "-m", "fxslice", *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def fxslice(*args, check=True):
    """``python -m fxslice …`` run in this process (``cli.main``: no interpreter and imports to start), with
    an environment of its own (``--max-memory`` sets a variable later commands would otherwise inherit)."""
    from fxslice.cli import main

    out, err, environ = io.StringIO(), io.StringIO(), os.environ
    os.environ = dict(environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit:  # argparse's own errors
                code = exit.code
    finally:
        os.environ = environ
    result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sliced_dir(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "sliced"
    result = command("slice", tiny_hf_dir, "--ratio", "0.25", "--calibration", VALID, "--samples", "8",
                     "--seq-len", "32", "--out", out)
    assert "saved to" in result.stdout
    return out


def test_slice_writes_a_loadable_directory_with_tokenizer(sliced_dir):
    names = {p.name for p in sliced_dir.iterdir()}
    assert {"fxslice.json", "model.safetensors", "config.json", "tokenizer.json"} <= names


def test_slice_streams_a_checkpoint_within_a_small_budget_to_the_same_model(sliced_dir, tiny_hf_dir, tmp_path):
    import torch

    import fxslice as library

    out = tmp_path / "streamed"
    result = fxslice("slice", tiny_hf_dir, "--ratio", "0.25", "--calibration", VALID, "--samples", "8",
                     "--seq-len", "32", "--stream-budget", "0.00005", "--out", out)  # about 50 kB of weights
    assert "streaming" in result.stderr
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # saved shard by shard, each within the budget
    ids = torch.arange(2, 26).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(library.load(out)(ids).logits, library.load(sliced_dir)(ids).logits)


def test_slice_in_bfloat16_on_a_named_device_saves_a_bfloat16_model_that_evaluates(tiny_hf_dir, tmp_path):
    out = tmp_path / "bf16"
    fxslice("slice", tiny_hf_dir, "--ratio", "0.25", "--calibration", VALID, "--samples", "4", "--seq-len", "32",
            "--dtype", "bfloat16", "--device", "cpu", "--out", out)
    recipe = json.loads((out / "fxslice.json").read_text())
    assert recipe["dtype"] == "bfloat16" and recipe["device"] == "cpu"
    result = fxslice("eval", out, "--text", VALID, "--seq-len", "32", "--max-windows", "2", "--device", "cpu")
    assert float(result.stdout.split()[-1]) > 1.0


def test_eval_prints_a_perplexity(sliced_dir):
    result = fxslice("eval", sliced_dir, "--text", VALID, "--seq-len", "32", "--max-windows", "4")
    assert float(result.stdout.split()[-1]) > 1.0


def test_generate_continues_the_prompt(sliced_dir):
    result = fxslice("generate", sliced_dir, "the first", "--max-new-tokens", "5")
    assert result.stdout.startswith("the first") and len(result.stdout.split()) == 7


def test_inspect_lists_states_and_skips(tiny_hf_dir):
    summary = json.loads(fxslice("inspect", tiny_hf_dir).stdout)
    (region,) = summary["regions"]
    assert region["rotatable"] and len(region["states"]) == 9 and region["skip_edges"] == 8
    assert region["states"][0]["module"] == "model.embed_tokens"


@pytest.mark.parametrize("arguments, message", [
    (["slice", "{model}", "--ratio", "1.5", "--calibration", VALID, "--out", "{out}"], "must be in [0, 1)"),
    (["slice", "{model}", "--ratio", "0.25", "--calibration", "missing.txt", "--out", "{out}"], "file not found"),
    (["slice", "{tmp}", "--ratio", "0.25", "--calibration", VALID, "--out", "{out}"], "not a model directory"),
    (["slice", "{model}", "--budget", "0", "--calibration", VALID, "--out", "{out}"], "must be in (0, 1]"),
    (["slice", "{model}", "--budget", "0.9", "--ratio", "0.25", "--calibration", VALID, "--out", "{out}"],
     "not allowed with argument"),
    (["slice", "{model}", "--ratio", "0.25", "--schedule", "sensitivity", "--calibration", VALID, "--out", "{out}"],
     "spreads a parameter budget"),
    (["eval", "{tmp}", "--text", VALID], "not an fxslice model"),
    (["generate", "{model}", "hello"], "not an fxslice model"),
    (["inspect", "{tmp}/nowhere"], "not found"),
    (["slice", "{model}", "--ratio", "0.25", "--calibration", VALID, "--samples", "4", "--seq-len", "100000",
      "--out", "{out}"], "has 256 positions"),
    (["slice", "{model}", "--ratio", "0.25", "--calibration", VALID, "--samples", "64", "--seq-len", "256",
      "--max-memory", "0.001", "--out", "{out}"], "needs an estimated"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_hf_dir, tmp_path, arguments, message):
    out = tmp_path / "out"
    result = fxslice(*[str(a).format(model=tiny_hf_dir, out=out, tmp=tmp_path) for a in arguments], check=False)
    stderr = result.stderr
    assert result.returncode == 2
    assert message in stderr and "Traceback" not in stderr
    lines = stderr.replace("\r", "\n").strip().splitlines()
    errors = [line for line in lines if ": error:" in line]
    # One error line, last; only progress lines (loading the model) may come before it.
    assert len(errors) == 1 and lines[-1] == errors[0] and message in errors[0], stderr
    assert not out.exists()


def test_no_rescale_is_recorded_and_leaves_the_norms_alone(tiny_hf_dir, sliced_dir, tmp_path):
    out = tmp_path / "plain"
    fxslice("slice", tiny_hf_dir, "--ratio", "0.25", "--calibration", VALID, "--samples", "8", "--seq-len", "32",
            "--no-rescale", "--out", out)
    for directory, rescaled in [(sliced_dir, True), (out, False)]:
        recipe = json.loads((directory / "fxslice.json").read_text())
        plan = recipe["plan"]
        assert {p["name"]: p["options"] for p in plan["passes"]}["slice"]["rescale"] is rescaled
        assert any(s["norm_gain"] is not None for s in plan["states"]) is rescaled


def test_a_package_name_is_a_model_when_it_ships_one_gguf_file(tmp_path):
    package = tmp_path / "two_ggufs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("a.gguf", "b.gguf"):
        (package / name).write_bytes(b"GGUF")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "fxslice", "inspect", "two_ggufs"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 2 and "two_ggufs ships 2 GGUF files" in result.stderr, result.stderr[-2000:]
    (package / "b.gguf").unlink()
    result = subprocess.run([sys.executable, "-m", "fxslice", "inspect", "two_ggufs"], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 2 and "a.gguf" in result.stderr, result.stderr[-2000:]  # found, not a real GGUF


def test_a_budget_shrinks_the_mlps_within_it(tiny_hf_dir, tmp_path):
    out = tmp_path / "budget"
    result = fxslice("slice", tiny_hf_dir, "--budget", "0.9", "--calibration", VALID, "--samples", "8",
                     "--seq-len", "32", "--out", out)
    ratio = float(result.stdout.split("(")[1].split("x)")[0])
    assert 0.85 < ratio <= 0.9, result.stdout
    plan = json.loads((out / "fxslice.json").read_text())["plan"]
    assert [p["name"] for p in plan["passes"]] == ["slice"]  # no fuse_norm: no weight copied for nothing
    assert all(kept < width for _, width, kept in plan["details"]["shrink_mlp"]["mlps"])
    mlps = json.loads(fxslice("inspect", out).stdout)["mlps"]  # with what each refit lost
    assert len(mlps) == 4 and all(0 < m["refit_error"] < 1 and m["width"][1] < m["width"][0] for m in mlps), mlps
    assert float(fxslice("eval", out, "--text", VALID, "--seq-len", "32", "--max-windows", "2").stdout.split()[-1]) > 1


def test_a_budget_out_of_reach_is_refused_and_writes_nothing(tiny_hf_dir, tmp_path):
    out = tmp_path / "none"
    result = fxslice("slice", tiny_hf_dir, "--budget", "0.2", "--calibration", VALID, "--samples", "2",
                     "--seq-len", "16", "--out", out, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot be met by shrinking the 4 MLPs" in result.stderr and not out.exists()


def test_heal_distils_into_the_saved_model_and_keeps_its_plan(tiny_hf_dir, sliced_dir, tmp_path):
    out, data = tmp_path / "healed", tmp_path / "some.txt"
    data.write_text("".join(VALID.read_text().splitlines(keepends=True)[:100]))
    result = fxslice("heal", sliced_dir, "--teacher", tiny_hf_dir, "--data", data, "--steps", "4", "--seq-len", "32",
                     "--batch-size", "4", "--eval-every", "2", "--lr", "3e-4", "--autocast", "bfloat16", "--out", out)
    assert "healed in" in result.stdout and "tokens/s" in result.stdout, result.stdout
    assert "peak memory" in result.stderr and "estimate" in result.stderr
    heal = json.loads((out / "heal.json").read_text())
    assert [h["step"] for h in heal["history"] if "validation" in h] == [0, 2, 4] and heal["report"]["steps"] == 4
    assert not (tmp_path / "healed.heal-state").exists(), "the resumable state outlived the saved model"
    saved, healed = (json.loads((d / "fxslice.json").read_text()) for d in (sliced_dir, out))
    assert {k: v for k, v in saved["plan"].items() if k != "timings"} == \
        {k: v for k, v in healed["plan"].items() if k != "timings"}
    # The best validation step's weights are saved: the compressed model's own when no step improved on it.
    assert (healed["sha256"] != saved["sha256"]) == (heal["report"]["best_step"] > 0)
    assert float(fxslice("eval", out, "--text", VALID, "--seq-len", "32", "--max-windows", "2").stdout.split()[-1]) > 1


def test_export_writes_programs_that_generate_from_a_prompt_with_torch_alone(sliced_dir, tmp_path):
    result = fxslice("export", sliced_dir, "--out", tmp_path / "pt2", "--cache-len", "64")
    assert "exported" in result.stdout and (tmp_path / "pt2" / "tokenizer.json").is_file()
    code = ("import sys; sys.modules['fxslice'] = None; sys.modules['transformers'] = None; "
            "sys.path.insert(0, 'examples'); import generate_pt2; "
            f"generate_pt2.main([{str(tmp_path / 'pt2')!r}, '--prompt', 'the of', '--max-new-tokens', '5'])")
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert alone.stdout.splitlines()[1].startswith("the of") and len(alone.stdout.split(",")) == 7
    refused = fxslice("export", sliced_dir, "--out", tmp_path / "hf", "--format", "hf", check=False)
    assert refused.returncode == 2 and "rotated per state" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def _png_size(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_inspect_a_saved_model_prints_its_plan_and_plots_it(sliced_dir, tmp_path):
    result = fxslice("inspect", sliced_dir)
    summary = json.loads(result.stdout)
    assert summary["rotation"] == "per_state" and summary["states"][1]["width"] == [64, 48]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"row": "dense", "parameters": 1000000, "perplexity": 20.0}\n'
                    '{"row": "0.25", "parameters": 890000, "perplexity": 30.0}\n')
    fxslice("inspect", sliced_dir, "--plot", tmp_path / "one.png")
    fxslice("inspect", sliced_dir, "--plot", tmp_path / "two.png", "--curve", rows)
    (width, one), (_, two) = _png_size(tmp_path / "one.png"), _png_size(tmp_path / "two.png")
    assert width > 500 and abs(two - 2 * one) < 10  # one panel (residual widths), then a second (the curve)
    refused = fxslice("inspect", tmp_path / "rows.jsonl", "--plot", tmp_path / "x.png", check=False)
    assert refused.returncode == 2 and not (tmp_path / "x.png").exists()
