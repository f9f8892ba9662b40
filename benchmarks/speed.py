"""Speed and size of sliced SmolLM2-135M-Instruct against the dense model, on this machine's CPU or a GPU.

    python benchmarks/speed.py                       # the table in the README (about 15 minutes on 2 cores)
    python benchmarks/speed.py --rows dense 0.25 --compile-rows
    python benchmarks/speed.py --device cuda --dtype bfloat16

Per row: total parameters (every one, inserted matrices included), prefill latency for 1×512 and 8×128
tokens, greedy decode tokens/s (batch 1, a 32-token prompt, --new-tokens generated, KV cache on both
sides: transformers' own for the dense model, fxslice's decoding graph for the sliced ones): medians of
--repeats rounds after a warm-up, the rows taking turns within each round so that a slow spell of the
machine falls on all of them. Then prefill latency again after ``torch.compile`` (inductor). On a GPU
each timed call ends by waiting for the device (``torch.cuda.synchronize``).

Slicing only changes shapes, so the sliced models here are calibrated on a smaller sample (16 windows ×
128 tokens) than the quality protocol; their widths, and so their speed, are the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from common import VALID, load_smollm2, machine, synchronised

ROWS = ["dense", "0.10", "0.25", "0.30", "0.25 head", "0.25 shared head"]
"""``dense``, ``ratio [head] [shared]`` or ``budget B``: ``head`` also slices the states the head reads;
``shared`` uses one rotation per stream (no skip matrices); ``budget B`` is ``slice(budget=B)``."""


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, lazy initialisation, compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(work: dict[str, dict], repeats: int) -> dict[str, dict[str, float]]:
    """``work[row][name]``: a callable. Each is warmed up once, then the rows take turns, one run of each
    of their callables per round, for ``repeats`` rounds: a slow spell of a shared machine falls on every
    row alike. Returns the median seconds of each."""
    for calls in work.values():
        for fn in calls.values():
            fn()
    times: dict = {row: {name: [] for name in calls} for row, calls in work.items()}
    for _ in range(repeats):
        for row, calls in work.items():
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[row][name].append(time.perf_counter() - start)
    return {row: {name: statistics.median(t) for name, t in named.items()} for row, named in times.items()}


def build(spec: str, model, tokenizer):
    import fxslice
    from fxslice import Rotate, fuse_norm, slice
    from fxslice.data import calibration_batches

    if spec == "dense":
        return model
    words = spec.split()
    calibration = calibration_batches(tokenizer, VALID, n_samples=16, seq_len=128, batch_size=8, seed=42)
    if words[0] == "budget":
        passes = [fuse_norm, slice(budget=float(words[1]))]
    else:
        passes = [fuse_norm, Rotate(shared="shared" in words, progress=False), slice(float(words[0]), head="head" in words)]
    return fxslice.compile(model, passes, calibration=calibration)


def parameters(model) -> int:
    from fxslice.graph import unique_parameters

    return unique_parameters(getattr(model, "graph_module", model))


def prefill_inputs(model) -> dict:
    """The token ids every row is timed on, by shape: 1×512 and 8×128, on the model's device."""
    generator = torch.Generator().manual_seed(0)
    return {shape: torch.randint(0, model.config.vocab_size, shape, generator=generator).to(model.device)
            for shape in ((1, 512), (8, 128))}


def workloads(model, args) -> dict:
    """The timed calls of one row: prefill 1×512 and 8×128 (no cache), and greedy decoding of
    ``--new-tokens`` after a 32-token prompt at batch 1."""
    ids = prefill_inputs(model)
    calls = {f"prefill_{b}x{t}_s": (lambda x=x: model(input_ids=x, use_cache=False)) for (b, t), x in ids.items()}
    prompt = ids[(1, 512)][:, :32]
    calls["decode_s"] = lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                               do_sample=False)
    return {name: synchronised(fn, args.device) for name, fn in calls.items()}


def compiled_prefill(model, args) -> dict:
    row = {}
    forward = model.graph_module if hasattr(model, "graph_module") else model
    dense_only = {} if hasattr(model, "graph_module") else {"use_cache": False}
    compiled = torch.compile(forward, dynamic=False)
    for shape, x in prefill_inputs(model).items():
        call = synchronised(lambda x=x: compiled(input_ids=x, attention_mask=torch.ones_like(x), **dense_only),
                            args.device)
        start = time.perf_counter()
        call()
        row[f"compile_{shape[0]}x{shape[1]}_s"] = time.perf_counter() - start
        row[f"compiled_prefill_{shape[0]}x{shape[1]}_s"] = median_seconds(call, args.repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile-rows", nargs="*", default=["dense", "0.25"],
                        help="rows also measured after torch.compile (inductor compiles for minutes on 2 cores)")
    parser.add_argument("--device", default="cpu", help="run (and compress) on this device, e.g. cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the weights' dtype, dense and sliced alike (statistics stay float64)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model = model.to(args.device, getattr(torch, args.dtype))
    models = {spec: build(spec, model, tokenizer) for spec in args.rows}
    with torch.no_grad():
        medians = interleaved_medians({spec: workloads(m, args) for spec, m in models.items()}, args.repeats)
        results = []
        for spec, m in models.items():
            row = {"row": spec, "parameters": parameters(m), **medians[spec]}
            row["decode_tok_s"] = args.new_tokens / row.pop("decode_s")
            if spec in args.compile_rows:
                row.update(compiled_prefill(m, args))
            results.append(row)
            print(row, flush=True, file=sys.stderr)
    dense = next((r for r in results if r["row"] == "dense"), None)

    def vs(r, key):  # this row ÷ dense
        return "" if dense is None or r is dense else f" ({r[key] / dense[key]:.2f}×)"

    command = "python benchmarks/speed.py" + ("" if args.rows == ROWS else " --rows " + " ".join(repr(r) for r in args.rows))
    if args.compile_rows != ["dense", "0.25"]:
        command += " --compile-rows " + " ".join(repr(r) for r in args.compile_rows)
    if args.repeats != 5:
        command += f" --repeats {args.repeats}"
    if args.device != "cpu" or args.dtype != "float32":
        command += f" --device {args.device} --dtype {args.dtype}"
    compiled = bool(args.compile_rows)
    where = "CPU" if args.device == "cpu" else args.device
    print(f"<!-- {machine(args.device)}, {where}, {args.dtype}, command: {command} -->")
    header = "| configuration | parameters | prefill 1×512 | prefill 8×128 | decode tokens/s |"
    line = "|---|---|---|---|---|"
    if compiled:
        header += " compiled prefill 1×512 | compiled prefill 8×128 |"
        line += "---|---|"
    print(header)
    print(line)
    for r in results:
        cells = [r["row"], f"{r['parameters'] / 1e6:.2f}M{vs(r, 'parameters')}"]
        for key in ("prefill_1x512_s", "prefill_8x128_s"):
            cells.append(f"{r[key] * 1e3:.0f} ms{vs(r, key)}")
        cells.append(f"{r['decode_tok_s']:.1f}{vs(r, 'decode_tok_s')}")
        if compiled:
            for key in ("compiled_prefill_1x512_s", "compiled_prefill_8x128_s"):
                cells.append(f"{r[key] * 1e3:.0f} ms{vs(r, key)}" if key in r else "not measured")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
