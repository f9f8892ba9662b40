"""The calibration memory estimate against the memory used (SmolLM2-135M-Instruct).

    python benchmarks/memory.py                  # about 5 minutes on 2 cores

For each calibration size, ``[fuse_norm, rotate, slice(0.25)]`` with the estimate ``fxslice.memory``
makes before the sweep, next to the resident memory the process gained while compiling (sampled every
20 ms from /proc/self/statm: the peak during ``compile`` less the resident memory just before it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import warnings

from common import VALID, load_smollm2, machine

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """The largest resident memory seen while the block runs."""

    def __enter__(self):
        self.peak, self.running = resident(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def measure(samples: int) -> None:
    """One row, in a fresh process (memory a previous run freed would otherwise still be resident)."""
    import fxslice
    from fxslice import fuse_norm, rotate, slice
    from fxslice.capture import capture
    from fxslice.data import calibration_batches, join_rows
    from fxslice.memory import GiB, calibration_estimate

    model, tokenizer = load_smollm2()
    batches = calibration_batches(tokenizer, join_rows(VALID), n_samples=samples, seq_len=512, batch_size=8, seed=42)
    estimate = calibration_estimate(capture(model), [((), b) for b in batches])
    before = resident()
    with PeakSampler() as sampler:
        fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=batches)
    gained, total = sampler.peak - before, sum(estimate.values())
    parts = ", ".join(f"{v / GiB:.2f}" for v in estimate.values())
    print(f"| {samples} × 512 | {total / GiB:.2f} ({parts}) | {gained / GiB:.2f} | {gained / total:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.one:
        return measure(args.one)
    print(f"<!-- {machine()}, CPU, command: python benchmarks/memory.py --samples {' '.join(map(str, args.samples))} -->")
    print("| calibration | estimate GiB (weights, cached, batch, statistics) | gained while compiling GiB | gained / estimate |")
    print("|---|---|---|---|", flush=True)
    for samples in args.samples:
        subprocess.run([sys.executable, __file__, "--one", str(samples)], check=True)


if __name__ == "__main__":
    main()
