"""Spectrum-schedule variants scored on *validation* text against the constant schedule.

    python benchmarks/schedules.py                    # about 11 minutes on 2 cores

SmolLM2-135M-Instruct calibrated with the protocol of benchmarks/quality.py (64 windows × 512 tokens of
valid.txt, seed 42) and scored on the first 32 non-overlapping 512-token windows of valid.txt, never
test.txt. ``spectrum 2048`` plans from a pre-pass of 2048 calibration tokens instead of
``SPECTRUM_TOKENS`` (4096); ``spectrum in-sample`` measures each state's losses on the same pre-pass tokens
its principal directions were fitted to, instead of holding half of the sequences out
(``PCARotation.folds = 1`` instead of 2).
"""

from __future__ import annotations

import argparse
import warnings

from common import VALID, load_smollm2, machine

ROWS = ["0.10 constant", "0.10 spectrum", "0.10 spectrum in-sample", "0.10 spectrum 2048", "0.25 constant",
        "0.25 spectrum"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=ROWS)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()

    import fxslice
    from fxslice import Rotate, fuse_norm, slice
    from fxslice.calibrate import RESCALE_EXPONENT, SPECTRUM_TOKENS, PCARotation, check_calibration
    from fxslice.data import calibration_batches
    from fxslice.eval import perplexity

    class Variant(PCARotation):
        """PCA calibration whose spectrum pre-pass reads ``tokens`` calibration tokens in ``folds`` folds."""

        def __init__(self, batches, tokens: int, folds: int):
            super().__init__(batches, progress=False, rescale=RESCALE_EXPONENT)
            self.tokens = tokens
            self.folds = folds

        def losses(self, gm, states, tokens=SPECTRUM_TOKENS, at="stream"):
            return super().losses(gm, states, self.tokens, at)

    warnings.simplefilter("ignore")
    model, tokenizer = load_smollm2()
    calibration = calibration_batches(tokenizer, VALID, n_samples=64, seq_len=512, batch_size=8, seed=42)
    batches = check_calibration(calibration, model, hf=True)
    print(f"<!-- {machine()}, CPU, command: python benchmarks/schedules.py"
          f"{'' if args.rows == ROWS else ' --rows ' + ' '.join(repr(r) for r in args.rows)} --windows {args.windows} -->")
    print("| configuration | validation perplexity | parameters |")
    print("|---|---|---|")
    for spec in args.rows:
        ratio, schedule, *variant = spec.split()
        if variant:
            tokens = int(variant[0]) if variant[0].isdigit() else SPECTRUM_TOKENS
            rotation = Rotate(source=Variant(batches, tokens, folds=1 if "in-sample" in variant else 2))
        else:
            rotation = Rotate(progress=False)
        sliced = fxslice.compile(model, [fuse_norm, rotation, slice(float(ratio), schedule=schedule)],
                                 calibration=calibration)
        ppl = perplexity(sliced, tokenizer, VALID, 512, max_windows=args.windows)
        print(f"| {spec} | {ppl:.2f} | {fxslice.report(sliced)['parameters']['after'] / 1e6:.2f}M |", flush=True)


if __name__ == "__main__":
    main()
