"""Choosing shrink_mlp's settings on validation text: SmolLM2-135M-Instruct, WikiText-2 valid only.

    python benchmarks/inner_widths.py                       # every row (about 40 minutes on 2 cores)
    python benchmarks/inner_widths.py --rows dense "slice 0.25" "mlp 0.1875 ridge=1e-3"

Calibration on 64 windows x 512 tokens of the joined valid stream (seed 42); perplexity on its first
--windows windows of 512 tokens. Never reads test.txt: these numbers choose settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from common import VALID, load_smollm2, machine

ROWS = ["dense", "slice 0.25", "mlp 0.1875", "mlp 0.1875 ridge=1e-3", "mlp 0.1875 ridge=1e-1", "mlp 0.42"]
"""``dense``, ``slice R`` (``[fuse_norm, rotate, slice(R)]``) or ``mlp R [ridge=X]``
(``[shrink_mlp(R, ridge=X)]``)."""


def passes_for(spec: str) -> list:
    from fxslice import fuse_norm, rotate, shrink_mlp, slice

    words = spec.split()
    if words[0] == "slice":
        return [fuse_norm, rotate, slice(float(words[1]))]
    options = {k: float(v) for k, v in (w.split("=") for w in words[2:])}
    return [shrink_mlp(float(words[1]), **options)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import fxslice
    from fxslice.data import calibration_batches, join_rows
    from fxslice.eval import perplexity

    model, tokenizer = load_smollm2()
    valid = join_rows(VALID)
    calibration = calibration_batches(tokenizer, valid, 64, 512, 8, seed=42)
    dense_parameters = sum(p.numel() for p in model.parameters())
    print(f"<!-- {machine()}, CPU, command: python benchmarks/inner_widths.py --windows {args.windows}"
          f"{'' if args.rows == ROWS else ' --rows ' + ' '.join(repr(r) for r in args.rows)} -->")
    print("| configuration | parameters | valid perplexity | seconds |")
    print("|---|---|---|---|")
    for spec in args.rows:
        start = time.perf_counter()
        compressed = model if spec == "dense" else fxslice.compile(model, passes_for(spec), calibration=calibration)
        seconds = time.perf_counter() - start
        parameters = fxslice.report(compressed)["parameters"]["after"] if spec != "dense" else dense_parameters
        ppl = perplexity(compressed, tokenizer, valid, 512, max_windows=args.windows, batch_size=4)
        print(json.dumps({"row": spec, "parameters": parameters, "valid": ppl, "s": seconds}), file=sys.stderr)
        print(f"| {spec} | {parameters / 1e6:.2f}M ({parameters / dense_parameters:.3f}×) | {ppl:.2f} | "
              f"{'' if spec == 'dense' else f'{seconds:.0f}'} |", flush=True)


if __name__ == "__main__":
    main()
