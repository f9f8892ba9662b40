"""Data-parallel calibration of SmolLM2-135M-Instruct: one process against two gloo processes (torchrun).

    python benchmarks/distributed.py            # about 10 minutes on 2 cores

``[fuse_norm, rotate, slice(0.25)]`` calibrated on the reference stream (64 windows × 512 tokens of
WikiText-2 valid, seed 42) three times, each in its own processes: one process with 2 threads, one
process with 1 thread, and ``torchrun --nproc-per-node 2`` (1 thread each, each process a share of the 8
batches). Against the 1-thread process (the same float32 kernels as the two): compression time, whether
the widths agree, the largest relative difference of any weight (and which), the logits' relative
difference on 2 test windows, and the perplexity on the first --windows test windows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import TEST, VALID, load_smollm2, machine


def compress(out: Path) -> None:
    """One side of the comparison (this process, or one of torchrun's): compress and save."""
    import torch.distributed as dist

    import fxslice
    from fxslice import distributed, fuse_norm, rotate, slice
    from fxslice.data import calibration_batches, join_rows

    with distributed.joined():
        model, tokenizer = load_smollm2()
        batches = calibration_batches(tokenizer, join_rows(VALID), n_samples=64, seq_len=512, batch_size=8, seed=42)
        if dist.is_initialized():
            dist.barrier()  # time the compression alone, from the same start
        start = time.perf_counter()
        sliced = fxslice.compile(model, [fuse_norm, rotate, slice(0.25)], calibration=distributed.share(batches))
        seconds = time.perf_counter() - start
        fxslice.save(sliced, out, overwrite=True)
        if distributed.rank() == 0:
            (out / "seconds").write_text(f"{seconds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.side:
        return compress(Path(args.side))

    import torch

    import fxslice
    from fxslice.data import consecutive_windows, join_rows
    from fxslice.eval import perplexity

    work = Path(tempfile.mkdtemp(prefix="fxslice-distributed-"))
    print(f"<!-- {machine()}, CPU, command: python benchmarks/distributed.py --windows {args.windows} -->")
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, "--side", str(work / "threads")], check=True)
    subprocess.run([sys.executable, __file__, "--side", str(work / "one")], check=True, env=one_thread)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                    "--side", str(work / "two")], check=True, env=one_thread)
    sides = ("threads", "one", "two")
    models = {side: fxslice.load(work / side) for side in sides}
    seconds = {side: float((work / side / "seconds").read_text()) for side in sides}
    _, tokenizer = load_smollm2()
    windows = consecutive_windows(tokenizer, join_rows(TEST), 512)[:2]
    with torch.no_grad():
        logits = {side: models[side](input_ids=windows).logits for side in sides}
    reference = models["one"].graph_module.state_dict()
    print("| run | compression s | widths as 1 process | max weight rel. diff | logits rel. diff | perplexity |")
    print("|---|---|---|---|---|---|")
    for side, label in zip(sides, ("1 process, 2 threads", "1 process, 1 thread", "2 processes (gloo), 1 thread each")):
        state = models[side].graph_module.state_dict()
        worst, name = max((float((state[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)), k)
                          for k in reference if reference[k].is_floating_point())
        widths = [s["width_after"] for s in fxslice.report(models[side])["states"]]
        same = widths == [s["width_after"] for s in fxslice.report(models["one"])["states"]]
        drift = float((logits[side] - logits["one"]).norm() / logits["one"].norm())
        ppl = perplexity(models[side], tokenizer, join_rows(TEST), max_windows=args.windows, batch_size=4)
        print(f"| {label} | {seconds[side]:.1f} | {same} | {worst:.1e} ({name.removeprefix('model.')}) | {drift:.1e} "
              f"| {ppl:.4f} |")


if __name__ == "__main__":
    main()
