"""``fxslice`` (also ``python -m fxslice``): slice, evaluate, generate with and inspect models.

    fxslice slice MODEL --ratio 0.25 --calibration valid.txt --out sliced/   [--gguf-file NAME]
    fxslice slice MODEL --budget 0.75 --calibration valid.txt --out small/   (inner widths, parameter budget)
    torchrun --nproc-per-node 2 -m fxslice slice ...   (each process calibrates a share of the windows)
    fxslice heal sliced/ --teacher MODEL --data valid.txt --steps 120 --out healed/   (distil from the dense model)
    fxslice eval sliced/ --text test.txt [--seq-len 512 --max-windows 64]
    fxslice generate sliced/ "The capital of France is" [--max-new-tokens 20]
    fxslice export sliced/ --out exported/ [--compiled] [--format hf]   (run with torch alone, or as a HF checkpoint)
    fxslice inspect MODEL [--gguf-file NAME]      (what fxslice finds in a dense model)
    fxslice inspect sliced/ --plot plan.png [--curve rows.jsonl]   (what was done to a saved one)

Bad input (a ratio outside [0, 1), a missing file, a directory that is not a model, a model that cannot be
captured) prints one line on stderr and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

__all__ = ["main"]


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): the fraction of each residual state to delete; got {value}")
    return value


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: the fraction of the dense parameters to keep; got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {path}")
    return path


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxslice", description="SliceGPT for any transformer, as graph passes.")
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("slice", help="compress a model with PCA calibration on a text file")
    s.add_argument("model", help="a Hugging Face model directory (or a .gguf file, or a directory with --gguf-file)")
    s.add_argument("--gguf-file", help="GGUF file name inside MODEL")
    amount = s.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", type=_ratio, help="fraction of each residual state's width to delete (SliceGPT)")
    amount.add_argument("--budget", type=_budget, help="largest parameter count to keep, as a fraction of the "
                        "dense model's: shrinks the MLPs' inner widths (slice(budget=…))")
    s.add_argument("--calibration", type=_existing_file, required=True, help="text file to calibrate on")
    s.add_argument("--samples", type=_positive, default=64, help="calibration windows (default 64)")
    s.add_argument("--seq-len", type=_positive, default=512, help="tokens per window (default 512)")
    s.add_argument("--batch-size", type=_positive, default=8)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--schedule", choices=["constant", "spectrum", "readers", "sensitivity"], default="constant",
                   help="how widths are spread over the states (slice's schedule=; choose on validation text); "
                        "with --budget: constant or sensitivity (MLP widths by their losses counted downstream)")
    s.add_argument("--shared", action="store_true", help="one rotation per stream: no skip matrices")
    head = s.add_mutually_exclusive_group()
    head.add_argument("--slice-head", dest="head", action="store_const", const=True,
                      help="also slice the states the output head reads (default: only when keeping them would "
                           "leave the model no smaller than dense)")
    head.add_argument("--keep-head", dest="head", action="store_const", const=False,
                      help="never slice the states the output head reads")
    s.add_argument("--no-rescale", action="store_true", help="do not rescale the norms' sinks after slicing "
                   "(slice(..., rescale=False); SliceGPT's behaviour)")
    s.add_argument("--out", required=True, help="directory to write the sliced model to")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--max-memory", type=float, metavar="GIB", help="refuse before calibrating when the estimated "
                   "memory beyond the loaded model exceeds this (default: what the machine has available)")
    s.add_argument("--device", help="compute on this device (e.g. cuda; default cpu): weights, activations and "
                   "the float64 statistics; the saved model loads on any device")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the weights' dtype while compressing and in the saved model (statistics stay float64)")
    s.add_argument("--stream-budget", type=float, metavar="GIB", default=2.0, help="a safetensors checkpoint is "
                   "streamed: its weights are read as the sweep reaches them and at most this many GiB of them are "
                   "held at once; rewritten ones beyond it spill to the temporary directory (default 2)")

    h = commands.add_parser("heal", help="recover a saved compressed model's quality by distillation from the dense model")
    h.add_argument("directory", help="a compressed model saved by fxslice (fxslice slice --out)")
    h.add_argument("--teacher", required=True, help="the dense model it was made from (as for fxslice slice MODEL)")
    h.add_argument("--gguf-file", help="GGUF file name inside TEACHER")
    h.add_argument("--data", type=_existing_file, required=True, help="text file to train on (its last "
                   "--val-windows windows are held out for the validation loss)")
    h.add_argument("--val-windows", type=_positive, default=8, help="held-out windows (default 8)")
    h.add_argument("--steps", type=_positive, required=True, help="optimiser steps")
    h.add_argument("--out", required=True, help="directory to write the healed model to")
    h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    h.add_argument("--lr", type=float, default=5e-5)
    h.add_argument("--seq-len", type=_positive, default=512, help="tokens per window (default 512)")
    h.add_argument("--batch-size", type=_positive, default=2, help="windows per step (default 2)")
    h.add_argument("--eval-every", type=_positive, default=20, help="steps between validation losses (default 20)")
    h.add_argument("--patience", type=_positive, help="stop after this many validations without improvement")
    h.add_argument("--lora-rank", type=_positive, help="train low-rank adapters of this rank (merged at the end) "
                   "instead of every weight")
    h.add_argument("--lora-alpha", type=float)
    h.add_argument("--lm-weight", type=float, default=0.0, help="weight of the next-token loss added to the KL "
                   "(default 0; 0.5 fits the model to the training text's domain: far lower perplexity there, a "
                   "little higher elsewhere)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--autocast", choices=["bfloat16", "float16"], help="compute in this dtype under torch.autocast "
                   "(weights stay float32): faster where the hardware multiplies in that dtype")
    h.add_argument("--state-dir", help="where the resumable state goes (default: OUT.heal-state beside OUT; "
                   "run the same command again to continue an interrupted run)")

    e = commands.add_parser("eval", help="perplexity of a saved model on a text file")
    e.add_argument("directory")
    e.add_argument("--text", type=_existing_file, required=True)
    e.add_argument("--seq-len", type=_positive, default=512)
    e.add_argument("--max-windows", type=_positive)
    e.add_argument("--batch-size", type=_positive, default=8)
    e.add_argument("--device", help="run on this device (default cpu)")

    g = commands.add_parser("generate", help="greedy generation from a saved model")
    g.add_argument("directory")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=_positive, default=32)
    g.add_argument("--device", help="run on this device (default cpu)")

    x = commands.add_parser("export", help="write a saved model as torch.export programs that run with torch alone "
                            "(or, --format hf, as a standard Hugging Face checkpoint where the structure allows)")
    x.add_argument("directory", help="a compressed model saved by fxslice")
    x.add_argument("--out", required=True)
    x.add_argument("--format", choices=["pt2", "hf"], default="pt2")
    x.add_argument("--batch-size", type=_positive, default=1, help="batch of the decoding program (default 1)")
    x.add_argument("--cache-len", type=_positive, default=1024, help="KV-cache positions of the decoding program")
    x.add_argument("--compiled", action="store_true", help="also AOTInductor-compiled packages (needs a C++ "
                   "compiler; minutes)")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    i = commands.add_parser("inspect", help="the residual states fxslice finds in a model, and what it would skip; "
                            "for a saved compressed model, what was done (--plot: as a picture)")
    i.add_argument("model", help="a model (as for fxslice slice) or a directory saved by fxslice")
    i.add_argument("--gguf-file")
    i.add_argument("--plot", help="for a saved model: draw widths before/after along the depth, dropped variance, "
                   "and the healing history when heal.json is there, to this file (PNG; needs matplotlib)")
    i.add_argument("--curve", type=_existing_file, help="JSON lines with 'parameters' and 'perplexity' (as "
                   "benchmarks/quality.py prints): add a perplexity / parameter panel to --plot")
    return parser


def _out_directory(path: str, overwrite: bool) -> Path:
    out = Path(path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    return out


def _slice(args) -> None:
    from fxslice import distributed

    with distributed.joined():
        if distributed.rank() == 0:
            return _slice_on_this_process(args)
        # The other processes under torchrun calibrate their share in silence; rank 0 reports and writes.
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return _slice_on_this_process(args)


def _slice_on_this_process(args) -> None:
    import torch

    import fxslice
    from fxslice import Rotate, distributed, fuse_norm, slice
    from fxslice.data import calibration_batches
    from fxslice.loading import load_causal_lm, load_tokenizer
    from fxslice.streaming import is_checkpoint

    # Built first: options that do not go together are refused before the model is loaded.
    if args.budget is not None:
        passes = [slice(budget=args.budget, schedule=args.schedule)]
    else:
        passes = [fuse_norm, Rotate(shared=args.shared), slice(args.ratio, schedule=args.schedule, head=args.head,
                                                                 rescale=not args.no_rescale)]
    out = _out_directory(args.out, args.overwrite)
    if args.max_memory is not None:
        from fxslice.memory import MAX_MEMORY_ENV

        os.environ[MAX_MEMORY_ENV] = str(args.max_memory)
    dtype = getattr(torch, args.dtype)
    streamed = args.gguf_file is None and is_checkpoint(args.model)
    if streamed:  # the weights are read as the passes reach them (fxslice.streaming)
        model, tokenizer = args.model, load_tokenizer(args.model)
        options = {"dtype": dtype, "device": args.device, "stream_budget": int(args.stream_budget * 1024**3)}
    else:
        model, tokenizer = load_causal_lm(args.model, args.gguf_file, dtype=dtype)
        model, options = model.to(args.device or "cpu"), {}
    processes = distributed.world_size()
    print(f"{'streaming' if streamed else 'loaded'} {args.model}; calibrating on {args.samples} windows of {args.seq_len} tokens"
          + (f" in {processes} processes" if processes > 1 else ""), file=sys.stderr)
    batches = calibration_batches(tokenizer, args.calibration, args.samples, args.seq_len, args.batch_size, args.seed)
    batches = distributed.share(batches)  # under torchrun, this process's share of the batches
    start = time.perf_counter()
    sliced = fxslice.compile(model, passes, calibration=batches, **options)
    report = fxslice.report(sliced)
    fxslice.save(sliced, out, tokenizer=tokenizer, overwrite=args.overwrite)
    p = report["parameters"]
    print(f"sliced in {time.perf_counter() - start:.0f} s: {p['before'] / 1e6:.2f}M -> {p['after'] / 1e6:.2f}M parameters "
          f"({p['ratio']:.3f}x); saved to {out}")


def _heal(args) -> None:
    import shutil

    import torch

    import fxslice
    from fxslice.data import consecutive_windows, windows_to_batches
    from fxslice.loading import load_causal_lm

    out = _out_directory(args.out, args.overwrite)
    compressed, tokenizer = _load(args.directory)
    teacher, _ = load_causal_lm(args.teacher, args.gguf_file)
    windows = consecutive_windows(tokenizer, args.data, args.seq_len)
    if windows.shape[0] <= args.val_windows:
        raise ValueError(f"{args.data} holds {windows.shape[0]} windows of {args.seq_len} tokens: not more than the "
                         f"{args.val_windows} held out (--val-windows); give more text or hold out fewer")
    train, held_out = windows[: -args.val_windows], windows[-args.val_windows :]
    print(f"healing {args.directory} from {args.teacher}: {train.shape[0]} windows of {args.seq_len} tokens "
          f"({args.val_windows} more held out), {args.steps} steps of {args.batch_size}", file=sys.stderr)
    state_dir = Path(args.state_dir) if args.state_dir else out.with_name(out.name + ".heal-state")
    healed = fxslice.heal(compressed, teacher, windows_to_batches(train, args.batch_size), args.steps, lr=args.lr,
                          validation=windows_to_batches(held_out, args.batch_size),
                          eval_every=args.eval_every, patience=args.patience, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, lm_weight=args.lm_weight, seed=args.seed, state_dir=state_dir,
                          autocast=getattr(torch, args.autocast) if args.autocast else None)
    fxslice.save(healed, out, tokenizer=tokenizer, overwrite=args.overwrite)
    (out / "heal.json").write_text(json.dumps({"report": fxslice.report(healed)["heal"],
                                               "history": healed.heal_history}, indent=1))
    if not args.state_dir:
        shutil.rmtree(state_dir, ignore_errors=True)
    h = fxslice.report(healed)["heal"]
    print(f"healed in {h['seconds']:.0f} s ({h['seconds_per_step']:.1f} s/step, {h['tokens_per_s']:.0f} tokens/s), "
          f"best step {h['best_step']:.0f}; saved to {out}")


def _load(directory: str, device: str | None = None):
    import fxslice
    from transformers import AutoTokenizer

    model = fxslice.load(directory, device=device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise fxslice.UnsupportedGraphError(f"{directory} has no tokenizer files: {error}") from error
    return model, tokenizer


def _eval(args) -> None:
    from fxslice.eval import perplexity

    model, tokenizer = _load(args.directory, args.device)
    ppl = perplexity(model, tokenizer, args.text, args.seq_len, args.max_windows, args.batch_size, progress=True)
    print(f"perplexity {ppl:.3f}")


def _generate(args) -> None:
    import torch

    model, tokenizer = _load(args.directory, args.device)
    ids = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


def _export(args) -> None:
    from fxslice.portable import export

    out = _out_directory(args.out, args.overwrite)
    model, tokenizer = _load(args.directory)
    export(model, out, format=args.format, batch_size=args.batch_size, cache_len=args.cache_len,
           compiled=args.compiled, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"exported {args.directory} to {out} ({args.format})")


def _inspect(args) -> None:
    if (Path(args.model) / "fxslice.json").is_file():
        return _inspect_saved(args)
    if args.plot or args.curve:
        raise ValueError(f"--plot and --curve draw what was done to a model saved by fxslice; {args.model} is not "
                         "one (it has no fxslice.json): run fxslice slice first")
    from fxslice.analysis import bind_parameters, find_regions, written_by
    from fxslice.capture import capture
    from fxslice.errors import module_path
    from fxslice.loading import load_causal_lm
    from fxslice.plan import plan_of

    model, _ = load_causal_lm(args.model, args.gguf_file)
    gm = capture(model)
    plan = plan_of(gm)
    prefix = plan.module_prefix
    regions = bind_parameters(gm, find_regions(gm))
    summary = {"model": plan.model_class, "regions": []}
    for region in regions:
        summary["regions"].append({
            "region": region.index,
            "rotatable": region.reason() is None,
            "reason": region.reason(),
            "norms": [module_path(n.output, prefix) for n in region.norms],
            "needs_centring": region.needs_centring,
            "states": [{"state": s.index, "module": written_by(s, prefix), "width": s.width,
                        "sources": len(s.sources), "sinks": len(s.sinks)} for s in region.states],
            "skip_edges": len(region.skips),
        })
    print(json.dumps(summary, indent=1))


def _inspect_saved(args) -> None:
    from fxslice.io import read_plan

    directory = Path(args.model)
    plan = read_plan(directory)
    inner = plan.details.get("shrink_mlp") or {}
    mlps, errors = inner.get("mlps") or [], dict(inner.get("refit_error") or ())
    print(json.dumps({"model": plan.model_class, "passes": [{"name": p.name, **p.kwargs} for p in plan.passes],
                      "rotation": plan.rotation,
                      "states": [{"module": s.module, "width": [s.width, s.width if s.kept is None else s.kept],
                                  "kept_variance": s.kept_variance} for s in plan.states],
                      "mlps": [{"name": name, "width": [before, after], "refit_error": errors.get(name)}
                               for name, before, after in mlps],
                      "skipped": len(plan.skipped)}, indent=1))
    if args.plot:
        from fxslice.plot import plot_plan

        curve = [json.loads(line) for line in Path(args.curve).read_text().splitlines() if line.strip()] if args.curve else None
        heal = directory / "heal.json"
        history = json.loads(heal.read_text()).get("history") if heal.is_file() else None
        plot_plan(plan, args.plot, curve=curve, heal_history=history, title=directory.name)
        print(f"plotted to {args.plot}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.environ.get("FXSLICE_DEBUG"):
        handlers = ()
    else:
        from fxslice.errors import UnsupportedGraphError

        handlers = (UnsupportedGraphError, FileNotFoundError, FileExistsError, ValueError, OSError, ImportError)
    warnings.simplefilter("ignore")
    try:
        {"slice": _slice, "heal": _heal, "eval": _eval, "generate": _generate, "export": _export,
         "inspect": _inspect}[args.command](args)
    except handlers as error:
        print(f"fxslice {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
