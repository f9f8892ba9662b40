"""The causal-LM census (benchmarks/zoo.py) in CI: a sample of model types that rotates with the date, and
every type with ``-m slow``.

The known outcomes below were measured with transformers 5.24.0 (``python benchmarks/zoo.py``); types a
later transformers adds are run but not asserted, types it drops are skipped. A type leaving ``KNOWN_OK``
is a regression; a type joining it is progress: add it here and raise ``MIN_OK``.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import zoo  # noqa: E402
from zoo_configs import MAX_PARAMETERS, count_parameters, tiny_config  # noqa: E402

KNOWN_OK = {
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "axk2", "bailing_hybrid", "bamba", "beam",
    "bigbird_pegasus", "biogpt", "bitnet", "blenderbot", "bloom", "codegen", "cohere", "cohere2", "cohere2_moe",
    "cohere_compass_text", "ctrl", "cwm", "deepseek_v2", "deepseek_v3", "deepseek_v32", "diffllama", "doge", "dory",
    "dots1", "dots3_note", "dots3_note_text", "emu3", "ergo", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4",
    "exaone_moe", "falcon", "falcon_h1", "falcon_mamba", "flex_olmo", "flint", "fuyu", "gemma", "gemma2", "gemma3",
    "gemma3_text", "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "glm", "glm4", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
    "gpt_neox_japanese", "gpt_oss", "gptj", "granite", "granite_swa", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "helium", "hrm_text", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3",
    "hy_v4", "hyperclovax", "internlm3", "iquestcoder", "jais2", "jamba", "jetmoe", "kimi_linear", "kolibri1",
    "kolibri1_1", "laguna", "lara_mini", "lfm2", "lfm2_moe", "lfm3", "llama", "llama4", "llama4_text", "mamba",
    "mamba2", "mbart", "megatron-bert", "mellum", "mimo_v2_flash", "minicpm3", "minicpm5_moe", "minimax_m2",
    "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral", "mllama", "moshi", "moss_transcribe_diarize",
    "mpt", "nanochat", "nemotron", "nemotron_h", "olmo", "olmo2", "olmo3", "olmo_hybrid", "olmoe", "opt", "pegasus",
    "persimmon", "phi", "phi3", "param2moe", "phi4_multimodal", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_5",
    "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next", "recurrent_gemma", "rembert",
    "roberta-prelayernorm", "sarvam_mla", "sarvam_moe", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2",
    "vaultgemma", "whisper", "xglm", "xlm-roberta-xl", "xlstm", "youtu", "zamba", "zamba2", "zaya",
}
"""Types that pass every step: build, capture, exact rotation, slice, save + load, cached generate."""
KNOWN_UNSUPPORTED = {
    "bart", "bert", "bert-generation", "big_bird", "blenderbot-small", "camembert", "data2vec-text", "electra",
    "ernie", "gemma3n", "gemma3n_text", "git", "inkling2_loop_text", "inkling2_text", "longcat_flash", "marian",
    "modernbert-decoder", "mvp", "openai-gpt", "plbart", "prophetnet", "reformer", "roberta", "roc_bert",
    "roformer", "rwkv", "trocr", "xlm", "xlm-roberta", "xlnet", "xmod",
}
"""Types fxslice refuses on purpose (post-norm streams and the like), with a reason."""
SLOW = {
    "bailing_hybrid", "dots3_note_text", "falcon_h1", "kimi_linear", "lara_mini", "nemotron_h", "olmo_hybrid",
    "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "xlstm", "zamba",
}
"""Types whose census took over a minute (2 busy cores): left to the full run."""
MIN_OK = 157
"""``ok`` rows of the full census with transformers 5.25.0 (of 200 types)."""
MIN_TINY_CONFIGS = 198
"""Types whose tiny config builds a model (on the meta device) with transformers 5.25.0."""

SAMPLE = 6
BUDGET_S = 20  # CI: start no further sampled type after this many seconds (the rest runs on other days)
TIMEOUT_S = 120
SEED = int(datetime.date.today().strftime("%Y%m%d"))


def _types() -> list[str]:
    return zoo.causal_lm_types()


def test_the_sample_is_deterministic_rotates_and_keeps_census_order():
    types = _types()
    first = zoo.sample(types, SAMPLE, SEED)
    assert first == zoo.sample(types, SAMPLE, SEED) and len(first) == SAMPLE
    assert first == [t for t in types if t in first]
    days = {tuple(zoo.sample(types, SAMPLE, SEED + day)) for day in range(7)}
    assert len(days) > 1, "the sample does not rotate with the date"


def test_rows_and_summary_render_as_markdown():
    row = {"type": "x", "outcome": "fail: rotate", "step": "rotate", "error": "a | b", "capture_error": 1e-7,
           "rotate_error": 0.5, "precision": "float64"}
    text = zoo.table_row(row)
    assert text.count(" | ") == zoo.HEADER.splitlines()[0].count(" | "), text
    assert "a \\| b" in text and "5.0e-01 **fails**" in text
    ok = {"type": "y", "outcome": "ok", "step": None, "capture_error": 1e-7, "rotate_error": 1e-15,
          "precision": "float64", "widths": "64→48", "ratio": 0.9}
    assert "| ok |" in zoo.table_row(ok) and "bitwise" in zoo.table_row(ok)
    import transformers

    line = zoo.summary([row, ok, {**ok, "type": "z", "outcome": "unsupported"}])
    assert f"1 of 3 causal-LM types in transformers {transformers.__version__} compress exactly" in line
    assert "ok: 1, unsupported: 1, fail: rotate: 1" in line


def test_a_model_that_rounds_its_own_values_to_float32_is_recognised():
    import torch

    from fxslice.capture import capture

    class Rounding(torch.nn.Module):
        def __init__(self, cast: bool):
            super().__init__()
            self.cast, self.scale = cast, torch.nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x):
            weight = self.scale.float().double()  # a parameter rounded: not a value computed from the inputs
            kept = x.float() if self.cast else x  # Mamba's residual_in_fp32
            return kept + weight * x

    x = torch.randn(2, 4, dtype=torch.float64)
    assert zoo.rounds_to_float32(capture(Rounding(cast=True), (x,)))
    assert not zoo.rounds_to_float32(capture(Rounding(cast=False), (x,)))


def test_first_line_drops_fxslice_advice():
    error = RuntimeError("fxslice pass 'rotate' failed (passes before it: fuse_norm); this is a bug in fxslice, "
                         "please report it with the model: KeyError: 'x'\nmore")
    expected = "RuntimeError: fxslice pass 'rotate' failed (passes before it: fuse_norm): KeyError: 'x'"
    assert zoo.first_line(error) == expected
    assert zoo.first_line("E: could not capture M (X: y). What to try: z.") == "E: could not capture M (X: y)"
    assert len(zoo.first_line("x" * 500)) == 161


def test_a_tiny_config_builds_for_every_causal_lm_type():
    """The factory names no type for most models; this is what makes the census cover them all."""
    built, failures = 0, {}
    for name in _types():
        try:
            parameters = count_parameters(tiny_config(name))
            assert parameters < MAX_PARAMETERS, f"{parameters} parameters"
            built += 1
        except Exception as error:  # collected: the assertion below lists them
            failures[name] = zoo.first_line(error)
    assert built >= min(MIN_TINY_CONFIGS, len(_types())), failures


def _sample() -> list[str]:
    """Today's types, in the order they run (a seeded shuffle, so the budget favours no part of the alphabet)."""
    chosen = zoo.sample([t for t in _types() if t not in SLOW], SAMPLE, SEED)
    random.Random(SEED).shuffle(chosen)
    return chosen


def test_the_census_of_todays_sample():
    """Each sampled type in its own process (as the census runs it); known outcomes must hold."""
    start, rows = time.perf_counter(), []
    for name in _sample():
        if rows and time.perf_counter() - start > BUDGET_S:
            break
        rows.append(zoo.run_child(name, TIMEOUT_S))
    assert rows, "nothing ran"
    wrong = []
    for row in rows:
        outcome = row["outcome"]
        assert outcome in ("ok", "unsupported", "no tiny config", "timeout") or outcome.startswith("fail: "), row
        assert row["outcome"] == "ok" or row["error"], row
        if row["type"] in KNOWN_OK and row["outcome"] != "ok":
            wrong.append(f"{row['type']}: {row['outcome']}: {row['error']}")
        if row["type"] in KNOWN_UNSUPPORTED and row["outcome"] not in ("ok", "unsupported"):
            wrong.append(f"{row['type']}: {row['outcome']} (was unsupported): {row['error']}")
        if row["outcome"] == "ok":  # every number the table shows holds
            exact = zoo.EXACT[row["precision"]]
            assert row["rotate_error"] <= exact and row["kv_cache"] and row["widths"], row
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_the_full_census_does_not_regress():
    rows = [zoo.run_child(name, 480 if name in SLOW else 240) for name in _types()]  # the slow types run past 240 s
    ok = {r["type"] for r in rows if r["outcome"] == "ok"}
    lost = sorted((KNOWN_OK & set(_types())) - ok)
    assert not lost, f"types that compressed exactly and no longer do: {lost}"
    assert len(ok) >= MIN_OK, zoo.summary(rows)
