"""Exporting sliced SmolLM2-135M-Instruct: torch.export programs and a standard Hugging Face checkpoint.

    python benchmarks/export.py                 # about 25 minutes on 2 cores
    python benchmarks/export.py --saved healed-small   # also a saved (e.g. healed) model
    python benchmarks/export.py --compiled      # also the AOTInductor packages (longer)

Models calibrated as in the quality protocol (64 windows × 512 tokens of WikiText-2 valid, seed 42):
``[fuse_norm, rotate, slice(0.25)]`` exported as ``.pt2`` programs (time, file sizes, and the checks
``export`` makes: bitwise for the programs); ``[fuse_norm, Rotate(shared=True), slice(0.25)]`` and
``[fuse_norm, slice(budget=0.75)]`` (and any --saved directory) exported as Hugging Face checkpoints,
loaded back with ``AutoModelForCausalLM`` and scored on the test stream next to the fxslice model they
came from (first --windows windows of 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from common import TEST, VALID, load_smollm2, machine


def size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--saved", nargs="*", default=[], help="also export these saved fxslice directories (e.g. "
                        "a healed model) as Hugging Face checkpoints and score them the same way")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import torch
    from transformers import AutoModelForCausalLM

    import fxslice
    from fxslice import Rotate, fuse_norm, rotate, slice
    from fxslice.data import calibration_batches, join_rows
    from fxslice.eval import perplexity
    from fxslice.graph import unique_parameters

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calibration = calibration_batches(tokenizer, join_rows(VALID), n_samples=64, seq_len=512, batch_size=8, seed=42)
    test = join_rows(TEST)
    work = Path(tempfile.mkdtemp(prefix="fxslice-export-"))
    command = "python benchmarks/export.py" + (" --compiled" if args.compiled else "") + "".join(
        f" --saved {d}" for d in args.saved)
    print(f"<!-- {machine()}, CPU, command: {command} -->")

    sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=calibration)
    start = time.perf_counter()
    fxslice.export(sliced, work / "pt2", compiled=args.compiled, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    manifest = json.loads((work / "pt2" / "manifest.json").read_text())
    files = ", ".join(f"{name} {size_mb(work / 'pt2' / name):.0f} MB" for name in manifest["sha256"] if name.endswith(".pt2"))
    print(f"- slice(0.25) → `.pt2`: {seconds:.0f} s (export, reload and check included); {files}; "
          f"max relative logit error against the model: {manifest['max_relative_error']}")

    dense = unique_parameters(model)

    def as_checkpoint(label: str, compressed) -> None:
        out = work / label.replace(" ", "_").replace("/", "_")
        start = time.perf_counter()
        fxslice.export(compressed, out, format="hf", tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        record = json.loads((out / "fxslice-export.json").read_text())
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ppl_fx = perplexity(compressed, tokenizer, test, 512, max_windows=args.windows)
        ppl_hf = perplexity(hf, tokenizer, test, 512, max_windows=args.windows)
        mine = unique_parameters(compressed.graph_module)
        print(f"- {label} → Hugging Face checkpoint: {seconds:.0f} s; hidden size {record['hidden_size'][0]} → "
              f"{hf.config.hidden_size}, intermediate size {hf.config.intermediate_size}, tie_word_embeddings="
              f"{hf.config.tie_word_embeddings}; parameters: fxslice model {mine / 1e6:.2f}M ({mine / dense:.3f}×), "
              f"checkpoint {hf.num_parameters() / 1e6:.2f}M ({hf.num_parameters() / dense:.3f}×); max relative "
              f"logit error {record['max_relative_error']:.2g}; test perplexity ({args.windows} windows): fxslice "
              f"{ppl_fx:.4f}, from_pretrained {ppl_hf:.4f}", flush=True)

    as_checkpoint("[fuse_norm, Rotate(shared=True), slice(0.25)]",
                  fxslice.compile(model, [fuse_norm, Rotate(shared=True), slice(0.25)], calibration=calibration))
    as_checkpoint("[fuse_norm, slice(budget=0.75)]", fxslice.compile(model, [fuse_norm, slice(budget=0.75)],
                                                                     calibration=calibration))
    for directory in args.saved:
        as_checkpoint(f"saved {Path(directory).name}", fxslice.load(directory))


if __name__ == "__main__":
    main()
