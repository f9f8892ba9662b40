"""Architecture coverage: capture, exactness of rotation, widths and parameters after slice(0.25) and
slice(budget=0.75).

    python benchmarks/coverage.py            # the architectures the core issue lists
    python benchmarks/coverage.py --all      # and the further ones in tests/hf_zoo.py

Tiny random-weight models from Hugging Face configs (width 64, 4 layers): a test of structure and exactness,
never of quality. Errors are max |a - b| / max |b| over the logits of 3 sequences of 13 tokens. Models whose
RMSNorm code computes in float32 even for float64 weights show ~1e-7 against the original in float64: that is
their own rounding; against ``[fuse_norm]`` (norms in float64) the rotation is exact. ``slice(budget=0.75)``
calibrates on 4 batches of random tokens; its column gives the MLP widths it chose, what it skipped and why,
and the parameter ratio, or the reason it could not compress.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fxslice  # noqa: E402
from fxslice import fuse_norm, rotate, slice  # noqa: E402
from hf_zoo import EXTRA, LISTED, tiny_model  # noqa: E402


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def row(name: str, ids: torch.Tensor) -> str:
    try:
        fxslice.capture(tiny_model(name))
        captured = "ok"
    except Exception as error:  # report, don't stop the table
        return f"| {name} | fails: {type(error).__name__} | | | | | | |"
    cells = []
    model = tiny_model(name, torch.float64)
    if model.dtype != torch.float64:
        cells += ["n/a (no float64 kernels)"] * 2
    else:
        rotated = logits(fxslice.compile(model, [fuse_norm, rotate]), ids)
        cells.append(f"{relative(rotated, logits(model, ids)):.1e}")
        cells.append(f"{relative(rotated, logits(fxslice.compile(model, [fuse_norm]), ids)):.1e}")
    model = tiny_model(name)
    cells.append(f"{relative(logits(fxslice.compile(model, [fuse_norm, rotate]), ids), logits(model, ids)):.1e}")
    model = tiny_model(name)
    sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)])
    report = fxslice.report(sliced)
    widths = sorted({(s["width_before"], s["width_after"]) for s in report["states"]})
    width_text = ", ".join(f"{b}→{a}" for b, a in widths) + f" ({len(report['states'])} states)"
    skipped = f", {len(report['skipped'])} skipped" if report["skipped"] else ""
    ratio = report["parameters"]["ratio"]
    return f"| {name} | {captured} | {' | '.join(cells)} | {width_text}{skipped} | {ratio:.3f} | {budget(name)} |"


def budget(name: str) -> str:
    """What slice(budget=0.75) did: the MLP widths, what it skipped, the parameter ratio (or why it failed)."""
    calibration = [{"input_ids": torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(seed))}
                   for seed in range(4)]
    try:
        report = fxslice.report(fxslice.compile(tiny_model(name), [fuse_norm, slice(budget=0.75)],
                                                calibration=calibration))
    except Exception as error:  # report, don't stop the table
        return f"fails: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    shrunk = report["inner"] or {}
    widths = sorted({(m, k) for _, m, k in shrunk.get("mlps", ())})
    text = ", ".join(f"{m}→{k}" for m, k in widths) + f" ({len(shrunk.get('mlps', ()))} MLPs)"
    if shrunk.get("skipped"):
        text += "; skipped " + "; ".join(shrunk["skipped"])
    return f"{text}, {report['parameters']['ratio']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also run the unlisted architectures")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (3, 13))
    names = LISTED + (EXTRA if args.all else [])
    print(f"<!-- {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"command: python benchmarks/coverage.py{' --all' if args.all else ''} -->")
    print("| architecture | capture | rotate vs original, float64 | rotate vs fuse_norm, float64 "
          "| rotate vs original, float32 | widths after slice(0.25) | parameters sliced / dense "
          "| slice(budget=0.75): MLP widths, parameters / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(row(name, ids), flush=True)


if __name__ == "__main__":
    main()
