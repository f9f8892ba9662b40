"""Taking a compressed model where fxslice is not: ``torch.export`` programs and standard checkpoints.

``export(model, out)`` writes (atomically: a staging directory moved into place at the end)

* ``prefill.pt2``: an ``ExportedProgram``; ``torch.export.load(path).module()(input_ids, attention_mask)``
  returns the logits ``[batch, tokens, vocab]`` at any batch and length, bitwise those of the model;
* ``decode.pt2``: one KV-cache step, ``(input_ids [B, T], attention_mask [B, past + T], position_ids [B, T],
  cache_position [T]) -> logits``, the cache held in the program's buffers (see ``README.md`` written
  next to it); the prompt is one call, each new token another with ``T = 1``;
* ``*.aoti.pt2``: the same two compiled ahead of time by AOTInductor (``torch._inductor.aoti_load_package``)
  when asked and a C++ compiler is present;
* ``manifest.json``: the calling convention and the sha256 of every file, ``README.md`` and the tokenizer.

Running them needs torch only. ``export(model, out, format="hf")`` instead writes an ordinary Hugging Face
directory when the compressed model *is* the original architecture at smaller sizes (no rotation or one
shared rotation, equal widths, nothing inserted but a tied head's bridge): see ``export_hf``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim

from .capture import refusal
from .decode import logit_error
from .errors import UnsupportedGraphError
from .graph import owner_of
from .io import sha256, write_atomically
from .model import SlicedCausalLM
from .plan import plan_of
from .streaming import materialize

__all__ = ["export"]

MANIFEST = "manifest.json"
PREFILL, DECODE = "prefill.pt2", "decode.pt2"


class _Logits(torch.nn.Module):
    """The compressed graph called as ``(input_ids, attention_mask) -> logits``: a plain tensor out, so
    the exported program's output needs no transformers class to unflatten."""

    def __init__(self, graph: fx.GraphModule):
        super().__init__()
        self.compressed = graph

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.compressed(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]


def export(model: Any, out: str | os.PathLike, *, format: str = "pt2", batch_size: int = 1,  # noqa: A002
           cache_len: int = 1024, compiled: bool = False, tokenizer: Any = None, overwrite: bool = False,
           progress: bool = True) -> Path:
    """Write ``model`` (a causal LM returned by ``fxslice.compile`` / ``load`` / ``heal``) to ``out``.

    ``format="pt2"``: ``prefill.pt2``, ``decode.pt2`` (batch ``batch_size``, a cache of ``cache_len``
    tokens) and, with ``compiled=True``, their AOTInductor packages; every program is loaded back and
    checked against the model before anything is moved into place. ``format="hf"``: a standard Hugging
    Face checkpoint (``export_hf``). ``out`` is replaced only with ``overwrite=True``.
    """
    if format not in ("pt2", "hf"):
        raise ValueError(f"format must be 'pt2' or 'hf'; got {format!r}")
    if not isinstance(model, SlicedCausalLM):
        raise UnsupportedGraphError(
            f"fxslice.export takes a Hugging Face causal LM compressed by fxslice (what compile/load return for "
            f"one); got {type(model).__name__}: for any other module call torch.export.export on the graph")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    write = _write_pt2 if format == "pt2" else export_hf
    options = dict(batch_size=batch_size, cache_len=cache_len, compiled=compiled, progress=progress) if format == "pt2" else {}
    return write_atomically(out, lambda staging: write(model, staging, tokenizer=tokenizer, **options))


def _write_pt2(model: SlicedCausalLM, staging: Path, *, batch_size: int, cache_len: int, compiled: bool,
               tokenizer: Any, progress: bool) -> None:
    from .decode import ONE_TOKEN, build_decoder

    if batch_size < 1 or cache_len < 2:
        raise ValueError(f"batch_size must be ≥ 1 and cache_len ≥ 2; got {batch_size}, {cache_len}")
    if compiled and shutil.which(os.environ.get("CXX", "c++")) is None:
        raise UnsupportedGraphError("compiled=True needs a C++ compiler for AOTInductor and none was found "
                                    "(set CXX, or export without --compiled)")
    say = print if progress else (lambda *a, **k: None)
    gm = materialize(model.graph_module)  # a streamed model is exported with its weights in memory
    vocab = int(model.config.vocab_size)
    steps = [("prefill", PREFILL), ("decode", DECODE)]
    for shape in ((2, 7), (3, 11)):  # the shapes the programs are exported and checked at
        ids = torch.zeros(shape, dtype=torch.long)
        why = refusal(gm, kwargs={"input_ids": ids, "attention_mask": ids})
        if why is not None:
            raise UnsupportedGraphError(
                f"this model's code specialised its graph to the sequence length it was captured at "
                f"({plan_of(gm).capture_length}; {why}), which prefill.pt2's interface (any length) does not "
                "describe; nothing was written. Run it through fxslice instead, which captures each length")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        say("fxslice export: exporting the prefill program", flush=True)
        prefill = _export_prefill(gm, vocab)
        torch.export.save(prefill, staging / PREFILL)
        say(f"fxslice export: building and exporting the decoding step (batch {batch_size}, cache {cache_len})",
            flush=True)
        decoder = build_decoder(model, batch_size, cache_len)
        if decoder.meta.get(ONE_TOKEN):
            raise UnsupportedGraphError("this model's decoding step takes one token per call (its layers keep "
                                        "recurrent states), which decode.pt2's interface (T tokens per call) does "
                                        "not describe; nothing was written. Generate through fxslice instead")
        decode = _export_decode(decoder, batch_size, cache_len)
        torch.export.save(decode, staging / DECODE)
        checks = {"prefill": _check_prefill(gm, torch.export.load(staging / PREFILL).module(), vocab, exact=True),
                  "decode": _check_decode(decoder, torch.export.load(staging / DECODE).module(), batch_size, vocab,
                                          exact=True)}
        if compiled:
            for name, program, file in (("prefill", prefill, PREFILL), ("decode", decode, DECODE)):
                path = staging / file.replace(".pt2", ".aoti.pt2")
                say(f"fxslice export: compiling the {name} program with AOTInductor (minutes)", flush=True)
                torch._inductor.aoti_compile_and_package(program, package_path=str(path))
                steps.append((f"{name}_aoti", path.name))
            loaded = {name: torch._inductor.aoti_load_package(str(staging / file)) for name, file in steps[2:]}
            checks["prefill_aoti"] = _check_prefill(gm, loaded["prefill_aoti"], vocab, exact=False)
            checks["decode_aoti"] = _check_decode(decoder, loaded["decode_aoti"], batch_size, vocab, exact=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    eos = model.generation_config.eos_token_id
    manifest = {
        "format": 1,
        "torch": torch.__version__,
        "model": model.config.model_type,
        "dtype": str(model.dtype).removeprefix("torch."),
        "vocab_size": vocab,
        "eos_token_id": eos,
        "prefill": {"file": PREFILL, "inputs": ["input_ids [B, T] int64", "attention_mask [B, T] int64"],
                    "output": "logits [B, T, vocab]"},
        "decode": {"file": DECODE, "batch_size": batch_size, "cache_len": cache_len,
                   "inputs": ["input_ids [B, T] int64", "attention_mask [B, past + T] int64",
                              "position_ids [B, T] int64", "cache_position [T] int64"],
                   "output": "logits [B, T, vocab]"},
        "compiled": {name: file for name, file in steps[2:]},
        "max_relative_error": checks,
    }
    (staging / "README.md").write_text(_README.format(batch=batch_size, cache=cache_len, vocab=vocab))
    manifest["sha256"] = {p.name: sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _export_prefill(gm: fx.GraphModule, vocab: int) -> torch.export.ExportedProgram:
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    dims = {0: Dim.AUTO, 1: Dim.AUTO}
    return torch.export.export(_Logits(gm), (ids, torch.ones_like(ids)), dynamic_shapes=(dims, dims), strict=False)


def _export_decode(decoder: fx.GraphModule, batch: int, length: int) -> torch.export.ExportedProgram:
    example = min(5, length - 2)
    kwargs = {"input_ids": torch.zeros(batch, example, dtype=torch.long),
              "attention_mask": torch.ones(batch, example + 1, dtype=torch.long),
              "position_ids": torch.arange(example).expand(batch, -1).contiguous(),
              "cache_position": torch.arange(example)}
    tokens, total = Dim("tokens", min=1, max=length - 1), Dim("total", min=1, max=length - 1)
    shapes = {"input_ids": {1: tokens}, "attention_mask": {1: total}, "position_ids": {1: tokens},
              "cache_position": {0: tokens}}
    return torch.export.export(decoder, (), kwargs, dynamic_shapes=shapes, strict=False)


def _agreement(mine: torch.Tensor, theirs: torch.Tensor, exact: bool, what: str) -> float:
    error, tolerance = logit_error(mine, theirs)
    if not error <= (0.0 if exact else tolerance):
        raise RuntimeError(f"the exported {what} does not reproduce the model (relative error {error:.2g}); "
                           "nothing was written")
    return error


def _check_prefill(gm: fx.GraphModule, program: Any, vocab: int, exact: bool) -> float:
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return _agreement(program(ids, mask), _Logits(gm)(ids, mask), exact, "prefill program")


def _check_decode(decoder: fx.GraphModule, program: Any, batch: int, vocab: int, exact: bool) -> float:
    """A 5-token prompt and 3 single-token steps through both, from the same cleared cache."""
    ids = torch.randint(0, vocab, (batch, 8), generator=torch.Generator().manual_seed(2))
    error = 0.0
    calls = [(slice(0, 5), torch.arange(5))] + [(slice(t, t + 1), torch.tensor([t])) for t in range(5, 8)]
    for part, positions in calls:
        kwargs = {"input_ids": ids[:, part], "attention_mask": torch.ones(batch, part.stop, dtype=torch.long),
                  "position_ids": positions.expand(batch, -1).contiguous(), "cache_position": positions}
        error = max(error, _agreement(program(**kwargs), decoder(**kwargs), exact, "decoding step"))
    return error


_README = """# A compressed causal LM exported by fxslice

Runs with torch alone (no fxslice, no transformers). Call everything under `torch.no_grad()`.

    import torch
    prefill = torch.export.load("prefill.pt2").module()
    logits = prefill(input_ids, attention_mask)          # int64 [B, T] each -> [B, T, {vocab}]

`decode.pt2` is one step of decoding with a KV cache of {cache} positions held in the program's buffers,
for batch {batch}:

    decode = torch.export.load("decode.pt2").module()
    logits = decode(input_ids=ids, attention_mask=mask, position_ids=pos, cache_position=cache_pos)

* `input_ids` [B, T]: the new tokens (the whole prompt first, then one token per call);
* `attention_mask` [B, past + T]: 1 for every real token so far including the new ones, 0 for padding;
* `position_ids` [B, T]: each new token's position (count of real tokens before it);
* `cache_position` [T]: the slots the new tokens take in the cache, `arange(past, past + T)`.

A call with `cache_position[0] == 0` starts a new sequence (the cache rewinds); past + T must stay below
{cache}. `prefill.aoti.pt2` / `decode.aoti.pt2`, when present, are the same programs compiled by AOTInductor:
`torch._inductor.aoti_load_package(path)(...)` with the same arguments. `manifest.json` holds the sha256 of
every file: check them before use (`hashlib.sha256(open(f, "rb").read()).hexdigest()`).
fxslice's `examples/generate_pt2.py` generates greedily from this directory with torch alone.
"""


def export_hf(model: SlicedCausalLM, staging: Path, tokenizer: Any = None) -> None:
    """Write ``model`` as the original Hugging Face architecture at smaller sizes, when it is one.

    It is one when the plan rotated no state or every state with one shared ``Q`` (``Rotate(shared=True)``),
    every state kept the same width ``k``, every MLP the same inner width, and the graph holds no tensor the
    architecture has no place for (skip matrices; a tied head's bridge is folded, see ``_fold_bridges``;
    the config's inner-width setting is found by ``_resized_config``). fxslice's norms are then RMS norms over ``k``
    with ``eps·d/k`` and their sinks carry ``√(d/k)`` (``Σx²/d + eps = (k/d)(Σx²/k + eps·d/k)``), which is
    the architecture's own norm at hidden size ``k`` with ``eps·d/k`` and a unit scale: the config gets
    ``k`` and that epsilon (the head width stays), every weight the graph reads goes to the parameter of
    the same name, and each norm's scale is set to what makes it the weightless norm. The result is
    checked against the model, saved, loaded back with ``from_pretrained`` and checked again.
    """
    from transformers import AutoModelForCausalLM

    from .capture import HF_PREFIX
    from .graph import get_tensor, tensor_targets

    gm = materialize(model.graph_module)
    plan = plan_of(gm)
    why = "fxslice export --format hf writes the original architecture at smaller sizes, "
    if plan.rotation == "per_state":
        raise UnsupportedGraphError(why + "which needs one rotation for every residual state; this model was rotated "
                                    "per state (skip matrices between states): compress with Rotate(shared=True), "
                                    "CLI --shared, or export --format pt2")
    widths = set(plan.widths)
    if len(widths) > 1:
        raise UnsupportedGraphError(why + f"which has one hidden size; this model's states have widths "
                                    f"{sorted(widths)}: use a constant slice, or export --format pt2")
    mlps = (plan.details.get("shrink_mlp") or {}).get("mlps") or []
    inner = {(before, after) for _, before, after in mlps if after != before}
    if len(inner) > 1:
        raise UnsupportedGraphError(why + f"which has one MLP width; this model's MLPs keep "
                                    f"{sorted({after for _, _, after in mlps})}: export --format pt2")
    values = (plan.details.get("shrink_values") or {}).get("values") or []
    if any(after != before for _, before, after in values):
        raise UnsupportedGraphError(why + "whose value heads are as wide as its query heads; this model's value heads "
                                    "were narrowed (shrink_values): export --format pt2")
    channels = (plan.details.get("shrink_query_key") or {}).get("channels") or []
    if any(len(kept[0]) != width for _, width, kept in channels):
        raise UnsupportedGraphError(why + "whose query and key heads are as wide as its value heads; this model's "
                                    "query and key heads were narrowed (shrink_query_key): export --format pt2")
    config = model.config.get_text_config()
    dense = int(config.hidden_size)
    kept = widths.pop() if widths else dense
    read = {t.removeprefix(HF_PREFIX): get_tensor(gm, t) for t in tensor_targets(gm)}
    new_config = _resized_config(model.config, dense, kept, inner.pop() if inner else None, read)
    target = _build(new_config, model.dtype)
    for name, tensor in list(read.items()):  # a tied weight is read under one of its names: give it all of them
        read.update({alias: tensor for alias in _tied_names(target, name)})
    merged, scales = _fold_bridges(gm, target, set(read))
    if any(_is_tied(target, name) for name in merged):  # the head gets its own weight: untie
        new_config.tie_word_embeddings = False
        new_config.get_text_config().tie_word_embeddings = False
        target = _build(new_config, model.dtype)
    mine = {**dict(target.named_buffers()), **target.state_dict(keep_vars=True)}  # with non-persistent buffers
    folded = {bridge for bridge, _ in (*merged.values(), *scales.values())}
    foreign = [name for name, tensor in read.items() if name not in mine and name not in folded and tensor.dim() > 0]
    if foreign:
        raise UnsupportedGraphError(why + f"and this model holds {len(foreign)} tensors the architecture has no place "
                                    f"for, e.g. {foreign[:3]} (matrices fxslice inserted): export --format pt2")
    with torch.no_grad():
        for name, tensor in read.items():
            if name not in mine:
                continue
            if tuple(mine[name].shape) != tuple(tensor.shape):
                raise UnsupportedGraphError(why + f"but {name} has shape {tuple(tensor.shape)} where the architecture "
                                            f"at hidden size {kept} has {tuple(mine[name].shape)}: export --format pt2")
            mine[name].copy_(tensor)
        for name, (_, weight) in merged.items():
            mine[name].copy_(weight)
        for name, parameter in target.named_parameters():
            if name not in read and name not in merged:
                scale = scales[name][1] if name in scales else None
                _make_weightless(target, name, parameter, kept, _norm_eps(new_config), scale)
    check = _compare_hf(model, target, "the rebuilt architecture")
    target.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=model.dtype, local_files_only=True).eval()
    check = max(check, _compare_hf(model, reloaded, "the checkpoint, loaded back with from_pretrained,"))
    (staging / "fxslice-export.json").write_text(json.dumps(
        {"from": plan.model_class, "hidden_size": [dense, kept], "max_relative_error": check,
         "sha256": {p.name: sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}}, indent=1))


def _build(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    from .loading import causal_lm_from_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return causal_lm_from_config(config, dtype).eval()


def _tied_names(model: torch.nn.Module, name: str) -> list[str]:
    """Every name of the parameter ``name`` (several when weights are tied)."""
    everything = dict(model.named_parameters(remove_duplicate=False))
    return [other for other, p in everything.items() if name in everything and p is everything[name]]


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    return len(_tied_names(model, name)) > 1


def _fold_bridges(gm: fx.GraphModule, target: torch.nn.Module, read: set[str]
                  ) -> tuple[dict[str, tuple[str, torch.Tensor]], dict[str, tuple[str, torch.Tensor]]]:
    """Inserted linears (fuse_norm's bridge before a tied head) that feed one bias-free linear of the
    architecture. Unrotated, the bridge is ``diag(γ)`` and goes back where fuse_norm took it from: the
    scale of the norm it reads, when the graph no longer reads that scale. Rotated (``Qᵀdiag(γ)Q``), it is
    folded into the linear: ``(xBᵀ)Wᵀ = x(WB)ᵀ``. Returns (linear's parameter name -> (the inserted
    weight's target, ``WB``), norm scale name -> (the inserted weight's target, ``γ``))."""
    from .analysis.ops import weight_use
    from .capture import HF_PREFIX
    from .errors import module_path
    from .graph import get_tensor, is_diagonal

    parameters = dict(target.named_parameters(remove_duplicate=False))
    names = set(parameters)
    merged, scales = {}, {}
    for node in gm.graph.nodes:
        inserted = weight_use(node)
        if inserted is None or inserted.kind != "linear" or inserted.bias is not None:
            continue
        if inserted.weight.removeprefix(HF_PREFIX) in names or len(node.users) != 1:
            continue
        head = weight_use(next(iter(node.users)))
        name = module_path(head.node, HF_PREFIX) + ".weight" if head is not None else None
        if head is None or head.kind != "linear" or head.input is not node or head.bias is not None or name not in names:
            continue
        w, b = get_tensor(gm, head.weight), get_tensor(gm, inserted.weight)
        bridge = inserted.weight.removeprefix(HF_PREFIX)
        unread = {n for n in names - read if tuple(parameters[n].shape) == (b.shape[0],)}
        norm = _scale_before(node.args[0], unread) if is_diagonal(b) else None
        if norm is not None:
            scales[norm] = (bridge, torch.diagonal(b).clone())
        else:
            merged[name] = (bridge, (w.double() @ b.double()).to(w.dtype))
    return merged, scales


def _scale_before(node: Any, unread: set[str], steps: int = 6) -> str | None:
    """The unread scale (one of ``unread``) of the norm that produced ``node``, looking back through the few
    ops (casts, the head's ``logits_to_keep`` slice) between a norm and what reads it."""
    from .capture import HF_PREFIX
    from .errors import module_path

    for _ in range(steps):
        if not isinstance(node, fx.Node):
            return None
        name = module_path(node, HF_PREFIX) + ".weight"
        if name in unread:
            return name
        node = node.args[0] if node.args else None
    return None


def _resized_config(config: Any, dense: int, kept: int, inner: tuple[int, int] | None,
                    shapes: dict[str, torch.Tensor]) -> Any:
    """A copy of ``config`` at hidden size ``kept``: attention head width kept, norm epsilons ``× dense/kept``;
    ``inner = (m, k)``: the integer setting equal to the MLPs' inner width ``m`` (whatever the config calls
    it) that, set to ``k``, gives the architecture the shapes of ``shapes`` becomes ``k`` (tried one at a
    time on the meta device: a vocabulary may be as large as an MLP)."""
    import copy

    config = copy.deepcopy(config)
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    if heads:  # a head width derived from the hidden size would shrink with it: pin it
        text.head_dim = getattr(text, "head_dim", None) or dense // heads
    text.hidden_size = kept
    for key, value in vars(text).items():
        if "eps" in key and isinstance(value, float):
            setattr(text, key, value * dense / kept)
    if inner is None:
        return config
    for key, value in list(vars(text).items()):
        if type(value) is int and value == inner[0] and key != "hidden_size":
            setattr(text, key, inner[1])
            with torch.device("meta"):
                built = _build(config, torch.float32)
            mine = dict(built.state_dict())
            if all(tuple(mine[name].shape) == tuple(t.shape) for name, t in shapes.items() if name in mine):
                return config
            setattr(text, key, value)
    return config


def _norm_eps(config: Any) -> float:
    values = [v for k, v in vars(config.get_text_config()).items() if "eps" in k and isinstance(v, float)]
    return values[0] if values else 1e-6


def _make_weightless(model: torch.nn.Module, name: str, parameter: torch.nn.Parameter, width: int, eps: float,
                     scale: torch.Tensor | None = None) -> None:
    """Set a parameter the graph does not read (a norm's scale or shift, which fxslice folded away) so that
    its module computes the weightless RMS norm ``x/√(Σx²/k + eps)`` (times ``scale`` when one is given):
    a shift is zero; a scale ``w`` enters
    the module's output affinely (``a + b·w``: ``w``, or ``1 + w`` for offset norms), so it is solved from
    the outputs at ``w = 0`` and ``w = 1`` by least squares."""
    module, leaf = owner_of(model, name)
    if parameter.dim() != 1 or parameter.shape[0] != width:
        raise UnsupportedGraphError(f"{name} (shape {tuple(parameter.shape)}) is a parameter the compressed graph "
                                    "does not read and not a norm fxslice folded: export --format pt2")
    if "bias" in leaf:
        parameter.zero_()
        return
    x = torch.randn(4, 7, width, generator=torch.Generator().manual_seed(0)).to(parameter.dtype)
    target = torch.nn.functional.rms_norm(x.double(), [width], eps=eps)
    if scale is not None:
        target = target * scale.double()
    parameter.zero_()
    a = module(x).double()
    parameter.fill_(1.0)
    b = module(x).double() - a
    solved = ((b * (target - a)).sum((0, 1)) / (b * b).sum((0, 1)).clamp_min(1e-30))
    parameter.copy_(solved.to(parameter.dtype))


def _compare_hf(model: SlicedCausalLM, other: torch.nn.Module, what: str) -> float:
    ids = torch.randint(0, int(model.config.vocab_size), (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
        mine = other(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    error, tolerance = logit_error(mine, theirs)
    if not error <= tolerance:
        raise UnsupportedGraphError(f"{what} does not reproduce the compressed model (relative error {error:.2g} "
                                    f"> {tolerance:g}): this architecture computes something from its hidden size that "
                                    "slicing changed (a scale that depends on it, a norm that is not RMS); export "
                                    "--format pt2")
    return error
