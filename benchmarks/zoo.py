"""Census: every causal-LM model type of the installed transformers, through every public step of fxslice.

    python benchmarks/zoo.py                          # every type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    python benchmarks/zoo.py --types llama gpt2       # some types
    python benchmarks/zoo.py --sample 6 --seed 1      # a deterministic sample (seed: today's date by default)
    python benchmarks/zoo.py --jsonl rows.jsonl       # also write the raw rows (--resume: keep them, run the rest)
    python benchmarks/zoo.py --sample 6 --budget 60   # CI: start no further type after 60 s

Each type runs in its own process (``--one TYPE``) under a time limit, on a tiny random-weight model from
``tests/zoo_configs.py`` (width 64, 2 layers): a test of structure and exactness, never of quality.
Steps: build (the tiny model runs); capture (``[fuse_norm]`` logits vs the original); rotate exact
(``[fuse_norm, rotate]`` vs ``[fuse_norm]``, max |a - b| / max |b| in float64, float32 when the model has
no float64 kernels); ``slice(0.25)`` with 2 calibration batches (float32; widths and parameter ratio);
``fxslice.save`` + ``load`` (logits bitwise equal); greedy ``generate(max_new_tokens=4)`` (the KV-cache
graph is used, without a fallback warning, and the tokens are the argmax chain of the model's own logits).
Outcomes: ``ok`` (every step), ``unsupported`` (fxslice refused the model's residual stream, with its
reason), ``fail: STEP`` (with the first line of the error), ``no tiny config``, ``timeout``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

STEPS = ("build", "capture", "rotate", "slice", "save", "generate")
EXACT = {"float64": 1e-9, "float32": 1e-4, "float32 inside": 1e-4}
"""Largest relative error of ``[fuse_norm, rotate]`` vs ``[fuse_norm]`` that counts as exact ("float32
inside": a float64 model whose own code rounds values it computes to float32)."""
UNSUPPORTED = re.compile(r"post-LN|post-norm|pre-norm|no residual stream|cannot be rotated|cannot be transformed", re.I)
"""An UnsupportedGraphError that says the residual stream cannot be rotated (a property of the model)."""
CAPTURE_TOLERANCE = {"float64": 1e-6, "float32": 1e-4, "float32 inside": 1e-4}
"""``[fuse_norm]`` vs the original model: norms that compute in float32 leave ~1e-7 even in float64 (more
where the model rounds other values to float32 too: "float32 inside")."""
SEQ, BATCH, NEW_TOKENS = 16, 2, 4


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sample(types: list[str], k: int, seed: int) -> list[str]:
    """``k`` types drawn with ``seed``, in census order (the same on every machine)."""
    chosen = set(random.Random(seed).sample(sorted(types), min(k, len(types))))
    return [t for t in types if t in chosen]


BOILERPLATE = [re.compile(p) for p in (r"; this is a bug in fxslice, please report it with the model",
                                       r"\.? What to (try|do): .*$")]


def first_line(error: BaseException | str, limit: int | None = 160) -> str:
    """The first line of an error, without fxslice's advice, for a table cell (``limit`` characters)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else text.strip()
    # An error whose first line is only a header ("Class validation error ...:") says more on the next one.
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    for pattern in BOILERPLATE:
        line = pattern.sub("", line)
    if limit is None or len(line) <= limit:
        return line
    return line[:limit] + "…"


# ---------------------------------------------------------------------------------------------- one type


def relative(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def rounds_to_float32(graph_module) -> bool:
    """Whether a float64 model's own code casts values computed from its inputs to float32 (Mamba keeps
    its residual in float32): a rotated stream is then exact only to float32's precision."""
    import torch

    from_inputs = set()
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" or any(arg in from_inputs for arg in node.all_input_nodes):
            from_inputs.add(node)
            source = node.args[0] if node.args else None
            if (node.op == "call_function" and getattr(node.meta.get("val"), "dtype", None) == torch.float32
                    and getattr(getattr(source, "meta", {}).get("val"), "dtype", None) == torch.float64):
                return True
    return False


def run_one(name: str) -> dict:
    """Every step for model type ``name``; stops at the first failing step. Returns the row."""
    import torch
    import transformers

    import fxslice
    from fxslice import CaptureError, UnsupportedGraphError, fuse_norm, rotate, slice
    from zoo_configs import tiny_config, tiny_model

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    row: dict = {"type": name, "outcome": None, "error": "", "step": None, "seconds": {}}
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # one left-padded row

    def logits(model, x=ids, m=mask):
        with torch.no_grad():
            return model(input_ids=x, attention_mask=m).logits

    step = "build"
    clock = time.perf_counter()

    def done(label: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        row["seconds"][label] = round(now - clock, 2)
        clock = now

    try:
        try:
            config = tiny_config(name)
            row["note"] = config.zoo_note
        except Exception as error:
            row.update(outcome="no tiny config", step="build", error=first_line(error))
            return row
        models = {}
        for dtype in (torch.float64, torch.float32):
            try:
                model = tiny_model(name, dtype, config=config)
                model.generation_config.eos_token_id = None  # generate the full length
                out = logits(model)
                if not torch.isfinite(out).all():
                    raise FloatingPointError("the original model's logits are not finite")
                models[dtype] = (model, out)
            except Exception as error:
                row.setdefault("build_errors", {})[str(dtype).split(".")[-1]] = first_line(error)
        if torch.float32 not in models:
            row.update(outcome="no tiny config", step="build", error=row["build_errors"]["float32"])
            return row
        exact_dtype = torch.float64 if torch.float64 in models else torch.float32
        precision = str(exact_dtype).split(".")[-1]
        row["precision"] = precision
        row["parameters"] = sum(p.numel() for p in models[torch.float32][0].parameters())
        done("build")

        step = "capture"
        model, reference = models[exact_dtype]
        try:
            fused = fxslice.compile(model, [fuse_norm])
        except CaptureError:
            raise
        except Exception:
            step = "rotate"  # captured; fuse_norm (the first half of the rotation) failed
            raise
        fused_logits = logits(fused)
        row["capture_error"] = relative(fused_logits, reference)
        if (precision == "float64" and row["capture_error"] > CAPTURE_TOLERANCE[precision]
                and rounds_to_float32(fxslice.compile(model, []).graph_module)):
            precision = row["precision"] = "float32 inside"  # fuse_norm computes its norms in float64
        if not row["capture_error"] <= CAPTURE_TOLERANCE[precision]:
            raise AssertionError(f"[fuse_norm] logits differ from the original by {row['capture_error']:.1e}")
        done("capture")

        step = "rotate"
        rotated = fxslice.compile(model, [fuse_norm, rotate])
        row["rotate_error"] = relative(logits(rotated), fused_logits)
        row["rotate_vs_original"] = relative(logits(rotated), reference)
        row["rotate_skipped"] = len(fxslice.report(rotated)["skipped"])
        if precision == "float64" and row["rotate_error"] > EXACT[precision] and rounds_to_float32(fused.graph_module):
            precision = row["precision"] = "float32 inside"
        if not row["rotate_error"] <= EXACT[precision]:
            raise AssertionError(f"rotation is not exact in {precision}: {row['rotate_error']:.1e}")
        done("rotate")

        step = "slice"
        model32, reference32 = models[torch.float32]
        calibration = [{"input_ids": torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(i))}
                       for i in range(2)]
        sliced = fxslice.compile(model32, [fuse_norm, rotate, slice(0.25)], calibration=calibration)
        report = fxslice.report(sliced)
        sliced_logits = logits(sliced)
        widths = sorted({(s["width_before"], s["width_after"]) for s in report["states"]})
        row["widths"] = ", ".join(f"{b}→{a}" for b, a in widths)
        row["states"] = len(report["states"])
        row["slice_skipped"] = [s.get("reason", "") for s in report["skipped"]]
        row["ratio"] = report["parameters"]["ratio"]
        if sliced_logits.shape != reference32.shape:
            raise AssertionError(f"sliced logits have shape {tuple(sliced_logits.shape)}, "
                                 f"not {tuple(reference32.shape)}")
        if not torch.isfinite(sliced_logits).all():
            raise AssertionError("sliced logits are not finite")
        if not any(a < b for b, a in widths):
            raise AssertionError(f"slice(0.25) narrowed no residual state (widths {row['widths']})")
        done("slice")

        step = "save"
        with tempfile.TemporaryDirectory() as parent:
            directory = os.path.join(parent, "model")
            fxslice.save(sliced, directory)
            loaded = fxslice.load(directory)
            if not torch.equal(logits(loaded), sliced_logits):
                raise AssertionError("logits after save + load are not bitwise equal")
        done("save")

        step = "generate"
        from transformers import GenerationConfig

        # Plain greedy decoding: no processor from the model's config (forced EOS, suppressed tokens, ...).
        sliced.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=None)
        prompt = ids[:1, :6]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sliced.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=0)
        fallback = [str(w.message) for w in caught if "KV-cache" in str(w.message)]
        chain = prompt
        for _ in range(NEW_TOKENS):
            next_token = logits(sliced, chain, torch.ones_like(chain))[:, -1].argmax(-1, keepdim=True)
            chain = torch.cat([chain, next_token], 1)
        row["kv_cache"] = not fallback and any(d is not None for d in sliced.decoders.values())
        if fallback:
            raise AssertionError(f"generate fell back to recomputing: {fallback[0]}")
        if not row["kv_cache"]:
            raise AssertionError("generate did not use the KV-cache decoding graph")
        if not torch.equal(out, chain):
            raise AssertionError(f"greedy generate {out[0, 6:].tolist()} != argmax chain {chain[0, 6:].tolist()}")
        done("generate")
        row.update(outcome="ok", step=None)
    except Exception as error:
        row["step"] = step
        row["error"] = first_line(error)
        row["error_full"] = first_line(error, None)[:2000]
        row["traceback"] = traceback.format_exc()[-3000:]
        if (isinstance(error, UnsupportedGraphError) and not isinstance(error, CaptureError)
                and step in ("capture", "rotate") and UNSUPPORTED.search(str(error))):
            row["outcome"] = "unsupported"
        else:
            row["outcome"] = f"fail: {step}"
    return row


# ---------------------------------------------------------------------------------------------- census


def run_child(name: str, timeout: float) -> dict:
    """``--one name`` in a fresh process; its last stdout line is the row."""
    command = [sys.executable, os.path.abspath(__file__), "--one", name]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"type": name, "outcome": "timeout", "step": None, "error": f"no result within {timeout:g} s",
                "wall": round(time.perf_counter() - start, 1)}
    wall = round(time.perf_counter() - start, 1)
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return {**json.loads(line), "wall": wall}
            except json.JSONDecodeError:
                break
    tail = (done.stderr or done.stdout).strip().splitlines()
    return {"type": name, "outcome": "fail: crash", "step": None, "wall": wall,
            "error": first_line(tail[-1] if tail else f"exit code {done.returncode}")}


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_row(row: dict) -> str:
    def reached(step: str) -> bool:
        order = {s: i for i, s in enumerate(STEPS)}
        return row["outcome"] == "ok" or (row.get("step") in order and order[row["step"]] > order[step])

    def status(step: str, detail: str = "ok") -> str:
        if reached(step):
            return detail
        return "**fails**" if row.get("step") == step else ""

    note = f" ({row['note']})" if row.get("note") else ""
    rotate_cell = ""
    if "rotate_error" in row:
        rotate_cell = f"{row['rotate_error']:.1e}" + ("" if row.get("precision") == "float64" else f" ({row.get('precision', 'float32')})")
        if row.get("step") == "rotate":
            rotate_cell += " **fails**"
    elif row.get("step") == "rotate":
        rotate_cell = "**fails**"
    slice_cell = status("slice", f"{row.get('widths', '')}; {row.get('ratio', 0):.3f}"
                        + (f"; {len(row['slice_skipped'])} skipped" if row.get("slice_skipped") else ""))
    outcome = row["outcome"]
    error = cell(row.get("error", "")) if outcome != "ok" else ""
    capture = f"{row['capture_error']:.0e}" if "capture_error" in row else "ok"
    return (f"| {row['type']}{cell(note)} | {status('build')} | {status('capture', capture)} | {rotate_cell} "
            f"| {slice_cell} | {status('save', 'bitwise')} | {status('generate', 'cached, = argmax')} | {outcome} "
            f"| {error} |")


HEADER = ("| type | build | capture ([fuse_norm] vs original) | rotate exact (rel. error vs fuse_norm) "
          "| slice(0.25): widths; params ratio | save+load | generate (KV cache) | outcome | first line of the error |\n"
          "|---|---|---|---|---|---|---|---|---|")


def summary(rows: list[dict]) -> str:
    import transformers

    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    ok = counts.get("ok", 0)
    order = sorted(counts, key=lambda k: (k != "ok", k != "unsupported", k))
    parts = ", ".join(f"{k}: {counts[k]}" for k in order)
    return (f"**{ok} of {len(rows)} causal-LM types in transformers {transformers.__version__} compress exactly** "
            f"({parts})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", metavar="TYPE", help="run one type in this process and print its row as JSON")
    parser.add_argument("--types", nargs="+", metavar="TYPE", help="these types only")
    parser.add_argument("--sample", type=int, metavar="K", help="a deterministic sample of K types")
    parser.add_argument("--seed", type=int, default=int(datetime.date.today().strftime("%Y%m%d")),
                        help="seed of --sample (default: today's date as YYYYMMDD)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per type (default 240)")
    parser.add_argument("--jsonl", metavar="FILE", help="write the raw rows to FILE")
    parser.add_argument("--resume", action="store_true",
                        help="with --jsonl: keep the rows already in FILE, run only the other types, append")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no further type after SECONDS (the census of a time-boxed CI job)")
    args = parser.parse_args()

    if args.one:
        import torch

        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        row = run_one(args.one)
        print(json.dumps(row, default=str), flush=True)
        return

    from common import machine

    types = causal_lm_types()
    if args.types:
        unknown = [t for t in args.types if t not in types]
        if unknown:
            raise SystemExit(f"not causal-LM types of this transformers: {unknown}")
        types = [t for t in types if t in args.types]
    if args.sample:
        types = sample(types, args.sample, args.seed)
    command = "python benchmarks/zoo.py " + " ".join(sys.argv[1:])
    print(f"<!-- {machine()}, command: {command.strip()}, {len(types)} types, {args.timeout:g} s each -->")
    print(HEADER, flush=True)
    rows = []
    if args.resume and args.jsonl and os.path.exists(args.jsonl):
        with open(args.jsonl) as source:
            earlier = {r["type"]: r for r in map(json.loads, filter(str.strip, source)) if r["type"] in types}
        for name in types:
            if name in earlier:
                rows.append(earlier[name])
                print(table_row(earlier[name]), flush=True)
        types = [t for t in types if t not in earlier]
    start = time.perf_counter()
    sink = open(args.jsonl, "a" if args.resume else "w") if args.jsonl else None
    try:
        for index, name in enumerate(types):
            if args.budget is not None and index and time.perf_counter() - start > args.budget:
                print(f"\n<!-- budget of {args.budget:g} s reached: {len(types) - index} types not run -->")
                break
            row = run_child(name, args.timeout)
            rows.append(row)
            print(table_row(row), flush=True)
            if sink:
                sink.write(json.dumps(row, default=str) + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()
    print()
    total = sum(r.get("wall", 0) for r in rows)
    print(summary(rows) + f"; {time.perf_counter() - start:.0f} s wall ({total:.0f} s in the types' processes)")


if __name__ == "__main__":
    main()
