"""Quality, size, time and memory of slicing a real model: SmolLM2-135M-Instruct on WikiText-2.

    python benchmarks/quality.py                 # the whole table (about an hour on 2 cores)
    python benchmarks/quality.py --rows dense "0.25 constant"
    python benchmarks/quality.py --rows budgets  # slice(budget=…) at 0.90 … 0.70
    python benchmarks/quality.py --rows dense "0.25 constant" --device cuda --dtype bfloat16

Protocol: the reference SliceGPT's stream (``fxslice.data.join_rows``: the dataset's rows joined by
blank lines) for calibration and evaluation alike; calibration on 64 windows x 512 tokens drawn from the
valid stream (seed 42 unless the row says ``seed=N``); evaluation on the first 64 non-overlapping
512-token windows of the test stream; float32 weights, PCA in float64, widths rounded down to multiples
of 8. Rows that differ only in their seed are summarised as mean and range. Every row runs in processes of
its own. The first, with the allocator's defaults, times one dense forward over the calibration tokens
and then the compression (each row's time ratio compares two timings taken back to back in one
process), and measures perplexity. The second (rows without ``seed=``) only compresses, with
MALLOC_MMAP_THRESHOLD_=1048576, and measures the peak RSS: glibc then returns freed tensors to the OS at
once, so the peak is memory in use rather than what the allocator kept after frees. That setting costs
every large allocation fresh page faults, so it is kept out of the timed run. On a GPU (``--device``)
there is no memory run (the RSS says nothing of the device's memory) and each timing waits for the device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import warnings

from common import TEST, VALID, load_smollm2, machine, synchronised

ROWS = [
    "dense",
    "0.20 constant", "0.20 spectrum",
    "0.25 constant", "0.25 constant seed=43", "0.25 constant seed=44",
    "0.25 spectrum", "0.25 spectrum seed=43", "0.25 spectrum seed=44",
    "0.25 constant norescale",
    "0.30 constant", "0.30 spectrum",
]
"""``ratio schedule [head] [shared] [norescale] [seed=N]``: ``head`` slices the states the head reads too;
``shared`` uses one rotation for the whole stream (no skip matrices); ``norescale`` is SliceGPT's
algorithm (``slice(..., rescale=False)``); ``seed`` draws other calibration windows.
``budget B [fused] [sensitivity] [seed=N]``: ``[slice(budget=B)]`` (at most B× the dense parameters, MLP
inner widths); ``fused`` runs ``fuse_norm`` before it, which folds every norm's scale into copies of the
weights that read it; ``sensitivity`` spreads the budget with ``schedule="sensitivity"``."""

BUDGET_ROWS = ["dense", "budget 0.90", "budget 0.89", "budget 0.89 seed=43", "budget 0.89 seed=44", "budget 0.85",
               "budget 0.80", "budget 0.75", "budget 0.70"]
"""``--rows budgets``: the parameter budgets of ``slice(budget=…)``."""

REFERENCE = {"dense": 26.78, "0.20": 41.48, "0.25": 46.63}
"""The reference SliceGPT's perplexity on this protocol and stream; its 25% model has 140.65M parameters
(1.046× dense: an untied full head and d × d skip matrices)."""


class PeakRSS:
    """Samples this process's resident set size every 20 ms while active."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def one_row(spec: str, samples: int, seq_len: int, windows: int, memory: bool = False, timed: bool = True,
            device: str = "cpu", dtype: str = "float32") -> dict:
    """One row: time and perplexity, or (``memory``) only the peak RSS of the compression; the model is
    moved to ``device`` in ``dtype`` before anything is measured."""
    import torch

    import fxslice
    from fxslice import Rotate, fuse_norm, slice
    from fxslice.data import calibration_batches, join_rows
    from fxslice.eval import perplexity
    from fxslice.graph import unique_parameters

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model = model.to(device, getattr(torch, dtype))
    words = spec.split()
    seed = int(next((w[5:] for w in words if w.startswith("seed=")), 42))
    test = join_rows(TEST)
    calibration = calibration_batches(tokenizer, join_rows(VALID), n_samples=samples, seq_len=seq_len,
                                      batch_size=8, seed=seed)
    row: dict = {"row": spec}

    def dense_forward() -> None:
        with torch.no_grad():
            for batch in calibration:
                model(**{k: v.to(device) for k, v in batch.items()})

    def dense_forward_s() -> float:
        start = time.perf_counter()
        synchronised(dense_forward, device)()
        return time.perf_counter() - start

    if spec == "dense":
        if timed:
            row["dense_forward_s"] = dense_forward_s()
        row["parameters"] = unique_parameters(model)
        row["perplexity"] = perplexity(model, tokenizer, test, seq_len, max_windows=windows)
        return row
    if words[0] == "budget":
        schedule = "sensitivity" if "sensitivity" in words else "constant"
        passes = [fuse_norm] * ("fused" in words) + [slice(budget=float(words[1]), schedule=schedule)]
    else:
        ratio, schedule = float(words[0]), words[1]
        rotation = Rotate(shared="shared" in words, progress=False)
        passes = [fuse_norm, rotation, slice(ratio, schedule=schedule, head="head" in words,
                                             rescale="norescale" not in words)]
    if memory:
        before = PeakRSS.now()
        with PeakRSS() as rss:
            compressed = fxslice.compile(model, passes, calibration=calibration)
        row["peak_rss_added"] = rss.peak - before
        row["compressed_weight_bytes"] = sum(p.numel() * p.element_size() for p in compressed.parameters())
        row["residual_activation_bytes"] = samples * seq_len * model.config.hidden_size * 4
        return row
    if timed:
        row["dense_forward_s"] = dense_forward_s()
    start = time.perf_counter()
    compressed = synchronised(lambda: fxslice.compile(model, passes, calibration=calibration), device)()
    row["compress_s"] = time.perf_counter() - start
    report = fxslice.report(compressed)
    row["eigh_s"] = (report["rotation"] or {}).get("eigh_s", 0.0)
    row["parameters"] = report["parameters"]["after"]
    row["widths"] = [s["width_after"] for s in report["states"]]
    row["inner_widths"] = [kept for _, _, kept in (report["inner"] or {}).get("mlps", [])]
    row["refit_errors"] = [error for _, error in (report["inner"] or {}).get("refit_error", [])]
    row["perplexity"] = perplexity(compressed, tokenizer, test, seq_len, max_windows=windows)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--perplexity-only", action="store_true", help="no dense-forward timing and no memory "
                        "process: perplexity, parameters and compression time only (for a machine shared with "
                        "other work, where timings would not mean anything)")
    parser.add_argument("--device", default="cpu", help="compress and evaluate on this device, e.g. cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the weights' dtype (statistics stay float64)")
    parser.add_argument("--table", metavar="ROWS.jsonl", help="only print the table of rows a run already measured "
                        "(the JSON lines it writes to stderr, e.g. from a run stopped before its last rows)")
    args = parser.parse_args()
    if args.rows == ["budgets"]:
        args.rows = BUDGET_ROWS
    if args.one:
        print(json.dumps(one_row(args.one, args.samples, args.seq_len, args.windows, args.memory,
                                 timed=not args.perplexity_only, device=args.device, dtype=args.dtype)), flush=True)
        return

    def run(spec: str, memory: bool) -> dict:
        command = [sys.executable, __file__, "--one", spec, "--samples", str(args.samples),
                   "--seq-len", str(args.seq_len), "--windows", str(args.windows)] + (["--memory"] if memory else []) \
            + (["--perplexity-only"] if args.perplexity_only else []) + ["--device", args.device, "--dtype", args.dtype]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"} if memory else dict(os.environ)
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    results = []
    if args.table:
        with open(args.table) as rows:
            results = [json.loads(line) for line in rows if line.strip()]
        args.rows = [r["row"] for r in results]
    for spec in [] if args.table else args.rows:
        memory = spec != "dense" and "seed=" not in spec and not args.perplexity_only and args.device == "cpu"
        results.append(run(spec, memory=False) | (run(spec, memory=True) if memory else {}))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    dense = next((r for r in results if r["row"] == "dense"), None)
    elsewhere = ""
    if (args.device, args.dtype) != ("cpu", "float32"):
        elsewhere = f" --device {args.device} --dtype {args.dtype}"
    print(f"<!-- {machine(args.device)}, {'CPU' if args.device == 'cpu' else args.device}, {args.dtype}, "
          f"command: python benchmarks/quality.py{'' if args.rows == ROWS else ' --rows ' + ' '.join(repr(r) for r in args.rows)}"
          f"{' --perplexity-only' if args.perplexity_only else ''}"
          f"{elsewhere} --samples {args.samples} --seq-len {args.seq_len} --windows {args.windows} -->")
    timed = any("dense_forward_s" in r for r in results)
    header = ["configuration", "perplexity", "× dense", "reference SliceGPT at this ratio", "parameters", "× dense"]
    if timed:
        header += ["compression time", "dense forward (same process)", "ratio (minus eigh)", "peak RSS added",
                   "estimate: weights + 2 activations"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    reference_dense = REFERENCE["dense"]
    for r in results:
        cells = [r["row"], f"{r['perplexity']:.2f}"]
        if r["row"] == "dense":
            cells += ["1.00×", f"{reference_dense}", f"{r['parameters'] / 1e6:.2f}M", ""]
            if timed:
                cells += ["", f"{r['dense_forward_s']:.1f} s" if "dense_forward_s" in r else "", "", "", ""]
            print("| " + " | ".join(cells) + " |")
            continue
        reference = REFERENCE.get(r["row"].split()[0])
        cells += [f"{r['perplexity'] / dense['perplexity']:.2f}×" if dense else "",
                  f"{reference} ({reference / reference_dense:.2f}×)" if reference else "",
                  f"{r['parameters'] / 1e6:.2f}M", f"{r['parameters'] / dense['parameters']:.3f}×" if dense else ""]
        if timed:
            forward = r.get("dense_forward_s")
            cells += [f"{r['compress_s']:.0f} s", f"{forward:.1f} s" if forward else "",
                      f"{(r['compress_s'] - r['eigh_s']) / forward:.2f}" if forward else ""]
            cells += ([f"{r['peak_rss_added'] / 2**20:.0f} MiB",
                       f"{(r['compressed_weight_bytes'] + 2 * r['residual_activation_bytes']) / 2**20:.0f} MiB"]
                      if "peak_rss_added" in r else ["", ""])
        print("| " + " | ".join(cells) + " |")
    spread = {}
    for r in results:
        key = " ".join(w for w in r["row"].split() if not w.startswith("seed="))
        spread.setdefault(key, []).append(r["perplexity"])
    for key, values in spread.items():
        if len(values) > 1:
            mean = sum(values) / len(values)
            print(f"\n{key}, {len(values)} calibration seeds: mean {mean:.2f}, range {min(values):.2f}–{max(values):.2f} "
                  f"(spread {max(values) - min(values):.2f}, {(max(values) - min(values)) / mean:.1%} of the mean)")


if __name__ == "__main__":
    main()
