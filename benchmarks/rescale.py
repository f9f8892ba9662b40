"""How the rescaling exponent was chosen: perplexity on *validation* text for several exponents.

    python benchmarks/rescale.py                      # about 20 minutes on 2 cores
    python benchmarks/rescale.py --exponents 0 8 --windows 16

SmolLM2-135M-Instruct at slice(0.25) (constant), calibrated with the protocol of benchmarks/quality.py
(64 windows × 512 tokens of valid.txt, seed 42), evaluated on the first ``--windows`` non-overlapping
512-token windows of valid.txt, never test.txt. Exponent 0 is SliceGPT (no rescaling). The control
multiplies the weight of every norm inside the blocks of the *dense* model by a gain, to show whether a gain alone helps the model.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from common import VALID, load_smollm2, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exponents", type=float, nargs="*", default=[0, 1, 2, 4, 8, 11, 16])
    parser.add_argument("--gains", type=float, nargs="*", default=[1.0, 1.005, 1.01, 1.02])
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()

    import fxslice
    from fxslice import Rotate, fuse_norm, slice
    from fxslice.calibrate import PCARotation, check_calibration
    from fxslice.data import calibration_batches
    from fxslice.eval import perplexity

    warnings.simplefilter("ignore")
    model, tokenizer = load_smollm2()
    calibration = calibration_batches(tokenizer, VALID, n_samples=64, seq_len=512, batch_size=8, seed=42)
    batches = check_calibration(calibration, model, hf=True)
    print(f"<!-- {machine()}, CPU, command: python benchmarks/rescale.py --exponents "
          f"{' '.join(f'{e:g}' for e in args.exponents)} --gains {' '.join(f'{g:g}' for g in args.gains)} "
          f"--windows {args.windows} -->")
    print(f"| slice(0.25), exponent | {' | '.join(f'{e:g}' for e in args.exponents)} |")
    print(f"|---|{'---|' * len(args.exponents)}")
    row, gains = [], []
    for exponent in args.exponents:
        # Rotate(source=...) replaces the PCA source compile would build, with a chosen exponent.
        source = PCARotation(batches, progress=False, rescale=exponent)
        sliced = fxslice.compile(model, [fuse_norm, Rotate(source=source), slice(0.25)], calibration=calibration)
        row.append(perplexity(sliced, tokenizer, VALID, 512, max_windows=args.windows))
        applied = [s["norm_gain"] for s in fxslice.report(sliced)["states"] if "norm_gain" in s] or [1.0]
        gains.append(f"{min(applied):.3f}–{max(applied):.3f}")
    print(f"| validation perplexity | {' | '.join(f'{p:.2f}' for p in row)} |")
    print(f"| gains of the sliced states | {' | '.join(gains)} |")
    print()
    print(f"| dense, block norms' weights × | {' | '.join(f'{g:g}' for g in args.gains)} |")
    print(f"|---|{'---|' * len(args.gains)}")
    # the norms inside the blocks (what rescaling touches), not the final norm before the head
    norms = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("layernorm.weight")}
    row = []
    for gain in args.gains:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in norms:
                    p.copy_(norms[name] * gain)
        row.append(perplexity(model, tokenizer, VALID, 512, max_windows=args.windows))
    print(f"| validation perplexity | {' | '.join(f'{p:.3f}' for p in row)} |")


if __name__ == "__main__":
    main()
