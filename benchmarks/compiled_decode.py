"""Compiled decoding: sliced SmolLM2-135M-Instruct against the dense model compiled the same way (CPU).

    python benchmarks/compiled_decode.py                 # about 30 minutes on 2 cores (inductor compiles)
    python benchmarks/compiled_decode.py --rows dense 0.25

Every row, the dense one included, is a graph fxslice captured (the dense one with no passes), decoded
through fxslice's KV-cache decoding graph: eagerly, and with ``generate(..., compiled=True)``
(``torch.compile``, inductor). Per row: parameters, greedy decode tokens/s at batch 1 (a 32-token prompt,
--new-tokens new ones; median of --repeats generations after a warm-up that also compiles), and the
prefill latency 1×512 of the graph after ``torch.compile(dynamic=False)``. Ratios are to the dense row
measured the same way, in the same process.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from common import load_smollm2, machine
from speed import build, median_seconds, parameters

ROWS = ["dense", "0.25", "0.25 shared head", "budget 0.75"]


@torch.no_grad()
def measure(spec: str, model, args) -> dict:
    import fxslice

    if spec == "dense":
        model = fxslice.compile(model, [])
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    prompt = ids[:, :32]
    row: dict = {"row": spec, "parameters": parameters(model)}
    for compiled in (False, True):
        def decode():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, compiled=compiled)

        start = time.perf_counter()
        decode()
        row[f"first_generate_{compiled}_s"] = time.perf_counter() - start  # includes building / compiling
        row[f"decode_{'compiled' if compiled else 'eager'}_tok_s"] = args.new_tokens / median_seconds(decode, args.repeats)
    forward = torch.compile(model.graph_module, dynamic=False)
    call = lambda: forward(input_ids=ids, attention_mask=torch.ones_like(ids))  # noqa: E731
    row["compiled_prefill_1x512_s"] = median_seconds(call, args.repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    results = []
    for spec in args.rows:
        row = measure(spec, build(spec, model, tokenizer), args)
        results.append(row)
        print(row, flush=True, file=sys.stderr)
    dense = next((r for r in results if r["row"] == "dense"), None)

    def vs(r, key):  # this row ÷ the dense row, measured the same way
        return "" if dense is None else f" ({r[key] / dense[key]:.2f}×)"

    command = "python benchmarks/compiled_decode.py" + ("" if args.rows == ROWS else " --rows " + " ".join(repr(r) for r in args.rows))
    command += "" if args.repeats == 5 else f" --repeats {args.repeats}"
    print(f"<!-- {machine()}, CPU, command: {command} -->")
    print("| configuration | parameters | decode tokens/s, eager | decode tokens/s, compiled | compiled prefill 1×512 | first compiled generate |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['parameters'] / 1e6:.2f}M | {r['decode_eager_tok_s']:.1f}{vs(r, 'decode_eager_tok_s')} | "
              f"{r['decode_compiled_tok_s']:.1f}{vs(r, 'decode_compiled_tok_s')} | "
              f"{r['compiled_prefill_1x512_s'] * 1e3:.0f} ms{vs(r, 'compiled_prefill_1x512_s')} | "
              f"{r['first_generate_True_s']:.0f} s |")


if __name__ == "__main__":
    main()
