"""Attention head widths inside a parameter budget: does narrowing values or queries/keys let the MLPs keep more?

    python benchmarks/attention_widths.py                   # dense; budget 0.75 alone; with shrink_values 0.25, 0.5
    python benchmarks/attention_widths.py --rows "values 0.5" "queries 0.25" --budget 0.89

SmolLM2-135M-Instruct, the reference stream (``fxslice.data.join_rows``): calibration on 64 × 512 tokens
drawn from the first 80% of the joined valid text, perplexity on the first 24 windows of 512 tokens of the
remaining 20% (text the calibration never saw; never the test windows), as ``benchmarks/mlp_allocation.py``.
Rows: ``dense``; ``budget``: ``[slice(budget=B)]`` (MLP inner widths only); ``values R``:
``[shrink_values(R), slice(budget=B)]`` (value heads narrowed by R first, the budget then counts what is
left, so the MLPs keep more channels); ``queries R``: ``[shrink_query_key(R), slice(budget=B)]`` (the
query and key heads narrowed by R, in rotary pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from common import held_out_valid, load_smollm2, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--rows", nargs="+", default=["dense", "budget", "values 0.25", "values 0.5"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import fxslice
    from fxslice import shrink_query_key, shrink_values, slice
    from fxslice.eval import perplexity

    model, tokenizer = load_smollm2()
    calibration, held = held_out_valid(tokenizer)
    rows = " ".join(f"'{r}'" for r in args.rows)
    print(f"<!-- {machine()}, command: python benchmarks/attention_widths.py --budget {args.budget} --rows {rows} -->")
    print("| row | value width | query/key width | MLP width | parameters / dense | held-out valid perplexity |")
    print("|---|---|---|---|---|---|")
    for spec in args.rows:
        words = spec.split()
        if words[0] == "dense":
            print(f"| dense | 64 | 64 | {model.config.intermediate_size} | 1.000 | "
                  f"{perplexity(model, tokenizer, held, 512, max_windows=24):.2f} |", flush=True)
            continue
        first = {"values": shrink_values, "queries": shrink_query_key}.get(words[0])
        passes = ([first(float(words[1]))] if first else []) + [slice(budget=args.budget)]
        compressed = fxslice.compile(model, passes, calibration=calibration)
        report = fxslice.report(compressed)
        values = sorted({k for _, _, k in (report["values"] or {}).get("values", [])}) or [64]
        queries = sorted({k for _, _, k in (report["query_key"] or {}).get("heads", [])}) or [64]
        inner = sorted({k for _, _, k in report["inner"]["mlps"]})
        row = {"row": spec, "budget": args.budget, "value_widths": values, "query_key_widths": queries, "mlp_widths": inner,
               "ratio": report["parameters"]["ratio"],
               "held_out_perplexity": perplexity(compressed, tokenizer, held, 512, max_windows=24)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        print(f"| {spec} | {', '.join(map(str, values))} | {', '.join(map(str, queries))} | {', '.join(map(str, inner))} | {row['ratio']:.3f} | "
              f"{row['held_out_perplexity']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
