"""Healing a compressed SmolLM2-135M-Instruct by distillation from the dense model, on WikiText-2 valid only.

    python benchmarks/heal.py                                  # slice(0.25), about 35 minutes on 2 cores
    python benchmarks/heal.py --compress "budget 0.75"
    python benchmarks/heal.py --lora-rank 32 --lr 5e-4
    python benchmarks/heal.py --steps 60 --lm-weight 0 0.5 --score validation   # choose a setting

Protocol: the reference SliceGPT's stream (rows joined by blank lines). Compression calibrates on 64
windows x 512 tokens of the valid stream (seed 42), as quality.py. Healing trains on the valid stream's
non-overlapping 512-token windows except its last --val-windows, which are the held-out validation set
(early stopping and the best step are chosen on them, never on test). Perplexity on the first
--test-windows windows of the test stream, and on the first --news-windows windows of BBC News (text
neither WikiText split holds; see domains.py), before and after healing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from common import TEST, VALID, load_smollm2, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compress", default="0.25", help='"R" for [fuse_norm, rotate, slice(R)] or "budget B"')
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=2, help="windows of 512 tokens per step")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--lm-weight", type=float, nargs="+", default=[0.0],
                        help="one healing run from the same compressed model for each value")
    parser.add_argument("--score", choices=["test", "validation"], default="test",
                        help="validation: perplexity on the held-out valid windows only (to choose settings)")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-windows", type=int, default=8)
    parser.add_argument("--test-windows", type=int, default=64)
    parser.add_argument("--news-windows", type=int, default=32)
    parser.add_argument("--dense", action="store_true", help="also score the dense model")
    parser.add_argument("--state-dir", default=None, help="resumable healing state")
    parser.add_argument("--out", default=None, help="save the healed model here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import torch

    import fxslice
    from domains import bbc_news
    from fxslice import fuse_norm, rotate, slice
    from fxslice.data import calibration_batches, consecutive_windows, join_rows, windows_to_batches
    from fxslice.eval import perplexity

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    valid = join_rows(VALID)
    calibration = calibration_batches(tokenizer, valid, n_samples=64, seq_len=512, batch_size=8, seed=42)
    words = args.compress.split()
    passes = [fuse_norm, slice(budget=float(words[1]))] if words[0] == "budget" else [fuse_norm, rotate, slice(float(words[0]))]
    compressed = fxslice.compile(model, passes, calibration=calibration)

    windows = consecutive_windows(tokenizer, valid, 512)
    train, held_out = windows[: -args.val_windows], windows[-args.val_windows :]
    if args.score == "validation":
        texts = {"held-out valid": (held_out, None)}
    else:
        texts = {"WikiText-2 test": (join_rows(TEST), args.test_windows), "BBC News": (bbc_news(), args.news_windows)}

    def scores(m) -> dict:
        return {name: perplexity(m, tokenizer, text, 512, max_windows=n) for name, (text, n) in texts.items()}

    rows = []
    if args.dense:
        rows.append({"row": "dense", "parameters": sum(p.numel() for p in model.parameters()), **scores(model)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows.append({"row": f"{args.compress}", "parameters": fxslice.report(compressed)["parameters"]["after"],
                 **scores(compressed)})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for lm_weight in args.lm_weight:
        start = time.perf_counter()
        healed = fxslice.heal(compressed, model, windows_to_batches(train, args.batch), steps=args.steps, lr=args.lr,
                              validation=windows_to_batches(held_out, args.batch), eval_every=args.eval_every,
                              lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lm_weight=lm_weight,
                              state_dir=args.state_dir, autocast=getattr(torch, args.autocast) if args.autocast else None)
        wall = time.perf_counter() - start
        timings = fxslice.report(healed)["heal"]
        label = f"{args.compress} healed" + (f", lm_weight {lm_weight:g}" if len(args.lm_weight) > 1 else "")
        rows.append({"row": label, "parameters": fxslice.report(healed)["parameters"]["after"],
                     **scores(healed), **timings, "wall_s": wall, "history": healed.heal_history})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.out:
            fxslice.save(healed, args.out, tokenizer=tokenizer, overwrite=True)

    command = " ".join(["python benchmarks/heal.py"] + sys.argv[1:])
    print(f"<!-- {machine()}, CPU, command: {command}; {len(train)} training windows, {args.val_windows} held out -->")
    print("| model | parameters | " + " | ".join(texts) + " | healing |")
    print("|---|---|" + "---|" * len(texts) + "---|")
    for r in rows:
        cells = [r["row"], f"{r['parameters'] / 1e6:.2f}M"] + [f"{r[name]:.2f}" for name in texts]
        cells.append(f"{r['steps']:.0f} steps (best {r['best_step']:.0f}), {r['seconds'] / 60:.1f} min, "
                     f"{r['tokens_per_s']:.0f} tokens/s, {r['seconds_per_step']:.1f} s/step, peak "
                     f"{r['peak_gib']:.1f} GiB (estimate {r['estimate_gib']:.1f})" if "seconds" in r else "")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
