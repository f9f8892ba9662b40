"""Streamed compression (``fxslice.compile(checkpoint_path, ...)``): memory against depth, and equality
with the in-memory path on SmolLM2.

    python benchmarks/streaming.py --depths 12 24 48      # synthetic Llama checkpoints; tens of minutes
    python benchmarks/streaming.py --smollm2              # about 10 minutes on 2 cores

``--depths``: for each depth a random-weight Llama checkpoint (benchmarks/synthetic_checkpoint.py,
hidden 1536, MLP 4096, 12 heads / 4 KV heads, vocabulary 32000, float32, one shard per layer) is written
to --work, then compressed in a fresh process with ``[fuse_norm, rotate, slice(0.25)]`` on --samples
random-token windows, and saved. Peak resident memory is VmHWM at the end less VmRSS after imports
and a warm-up (a one-layer model compressed first, so the code imported on first use is counted once);
the store's own peak and spill count come from its counters.

``--smollm2``: SmolLM2-135M-Instruct written as a safetensors checkpoint, then compressed twice on the
reference stream (64 × 512 tokens of WikiText-2 valid, seed 42): in memory, and streamed with a
--budget small enough that weights spill; perplexity on the first --windows test windows of both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import TEST, VALID, load_smollm2, machine

MiB = 1024**2


def status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def compress_streamed(checkpoint: Path, out: Path, budget: int, samples: int, seq_len: int) -> None:
    """One row, in this (fresh) process: print a JSON line of its measurements (memory gained over the
    process's own after a warm-up)."""
    import torch

    import fxslice
    from fxslice import fuse_norm, rotate, slice

    config = json.loads((checkpoint / "config.json").read_text())
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, config["vocab_size"], (1, seq_len), generator=generator)}
               for _ in range(samples)]
    warm_up()
    baseline = status("VmRSS")
    start = time.perf_counter()
    sliced = fxslice.compile(checkpoint, [fuse_norm, rotate, slice(0.25)], calibration=batches, stream_budget=budget)
    compiled = time.perf_counter() - start
    store = sliced.graph_module.meta["fxslice.streamed"]
    fxslice.save(sliced, out, overwrite=True)
    report = fxslice.report(sliced)["parameters"]
    print(json.dumps({"seconds": compiled, "save_seconds": time.perf_counter() - start - compiled,
                      "peak_gained": status("VmHWM") - baseline, "store_peak": store.peak, "spilled": store.spilled,
                      "reads": store.reads, "before": report["before"], "after": report["after"]}), flush=True)


def warm_up() -> None:
    """Compress a one-layer model of the same architecture, so that the code every run imports on first
    use (the model's module, torch.export, sympy) counts as the process's own, not as the job's."""
    import torch

    import fxslice
    from fxslice import fuse_norm, rotate, slice
    from synthetic_checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory() as work:
        write_checkpoint(Path(work), 1, 64, 128, 4, 2, 128)
        fxslice.compile(work, [fuse_norm, rotate, slice(0.25)], calibration=[{"input_ids": torch.arange(16)[None]}])


def depth_table(depths: list[int], work: Path, budget: int, samples: int, seq_len: int) -> None:
    from synthetic_checkpoint import write_checkpoint

    print(f"<!-- {machine()}, CPU, command: python benchmarks/streaming.py --depths {' '.join(map(str, depths))} "
          f"--budget {budget // MiB} --samples {samples} --seq-len {seq_len} -->")
    print("| layers | parameters | checkpoint GB | peak RSS gained GB | peak / checkpoint | store peak GB | "
          "spilled tensors | compress s | save s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for layers in depths:
        checkpoint, out = work / f"llama-{layers}", work / f"llama-{layers}-sliced"
        size = write_checkpoint(checkpoint, layers, 1536, 4096, 12, 4, 32000)
        row = subprocess.run([sys.executable, __file__, "--row", str(checkpoint), str(out), str(budget), str(samples),
                              str(seq_len)], check=True, capture_output=True, text=True)
        r = json.loads(row.stdout.strip().splitlines()[-1])
        print(f"| {layers} | {r['before'] / 1e9:.2f} B → {r['after'] / 1e9:.2f} B | {size / 1e9:.2f} | "
              f"{r['peak_gained'] / 1e9:.2f} | {r['peak_gained'] / size:.2f} | {r['store_peak'] / 1e9:.2f} | "
              f"{r['spilled']} | {r['seconds']:.0f} | {r['save_seconds']:.0f} |", flush=True)
        shutil.rmtree(checkpoint)
        shutil.rmtree(out)


def write_safetensors_copy(model, directory: Path) -> None:
    """``model`` as a Hugging Face safetensors checkpoint (transformers will not save a model it read from
    GGUF): its config without the GGUF quantisation entry, its state dict with a tied head stored once."""
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    config.__dict__.pop("quantization_config", None)
    config.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def smollm2(budget: int, windows: int) -> None:
    import torch

    import fxslice
    from fxslice import fuse_norm, rotate, slice
    from fxslice.data import calibration_batches, consecutive_windows, join_rows
    from fxslice.eval import perplexity

    model, tokenizer = load_smollm2()
    batches = calibration_batches(tokenizer, join_rows(VALID), n_samples=64, seq_len=512, batch_size=8, seed=42)
    test = consecutive_windows(tokenizer, join_rows(TEST), seq_len=512)[:2]
    passes = [fuse_norm, rotate, slice(0.25)]
    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(work) / "smollm2"
        write_safetensors_copy(model, checkpoint)
        start = time.perf_counter()
        in_memory = fxslice.compile(model, passes, calibration=batches)
        memory_seconds = time.perf_counter() - start
        start = time.perf_counter()
        streamed = fxslice.compile(checkpoint, passes, calibration=batches, stream_budget=budget)
        streamed_seconds = time.perf_counter() - start
        store = streamed.graph_module.meta["fxslice.streamed"]
        spilled, store_peak = store.spilled, store.peak
        a, b = (perplexity(m, tokenizer, join_rows(TEST), max_windows=windows, batch_size=4) for m in (in_memory, streamed))
        with torch.no_grad():
            x, y = in_memory(test).logits, streamed(test).logits
    print(f"<!-- {machine()}, CPU, command: python benchmarks/streaming.py --smollm2 --budget {budget // MiB} "
          f"--windows {windows} -->")
    print("| SmolLM2 slice(0.25) | compress s | perplexity | logits vs in memory |")
    print("|---|---|---|---|")
    print(f"| in memory | {memory_seconds:.0f} | {a:.4f} | |")
    print(f"| streamed, budget {budget // MiB} MiB ({spilled} tensors spilled, store peak {store_peak / MiB:.0f} MiB) | "
          f"{streamed_seconds:.0f} | {b:.4f} | {float((x - y).abs().max() / x.abs().max()):.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--budget", type=int, default=256, help="store budget, MiB")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--row", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.row:
        checkpoint, out, budget, samples, seq_len = args.row
        return compress_streamed(Path(checkpoint), Path(out), int(budget), int(samples), int(seq_len))
    if args.depths:
        depth_table(args.depths, args.work, args.budget * MiB, args.samples, args.seq_len)
    if args.smollm2:
        smollm2(args.budget * MiB, args.windows)


if __name__ == "__main__":
    main()
