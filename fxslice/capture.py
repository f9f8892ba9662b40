"""Model + example inputs -> a GraphModule of ATen ops, through ``torch.export`` (non-strict, dynamic dims).

The result takes the same inputs as the model (the flattening to graph placeholders is done by the
GraphModule's own pytree code) and returns the same output structure, at any batch and sequence size.
Hugging Face causal LMs are captured through a thin call that fixes ``use_cache=False``; their inputs are
``input_ids`` and ``attention_mask``.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import optree
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import Dim

from .analysis.norms import rms_normalised
from .errors import CaptureError
from .graph import aten, eliminate_dead_code, flat_inputs, is_op, unique_parameters, val
from .plan import Plan, plan_of, set_plan

__all__ = ["HF_PREFIX", "capture", "example_like", "export_graph", "is_hf_causal_lm", "refusal"]

HF_PREFIX = "model."
"""Hugging Face models are captured inside a wrapper whose attribute is ``model``; reports strip it."""


def is_hf_causal_lm(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "get_output_embeddings")


class _CausalLMCall(torch.nn.Module):
    """``model(input_ids, attention_mask, use_cache=False)``: the function a causal LM is captured as."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def _hf_example_inputs(model, example_inputs) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    if example_inputs is None:
        vocab = int(getattr(model.config, "vocab_size", 128) or 128)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 16), generator=gen).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = {"input_ids": example_inputs}
    if not isinstance(example_inputs, dict) or "input_ids" not in example_inputs:
        raise CaptureError(
            f"example inputs for {type(model).__name__} must be a dict with 'input_ids' (and optionally "
            f"'attention_mask'); got {type(example_inputs).__name__}"
        )
    ids = example_inputs["input_ids"].to(device)  # the model runs on fakes of them: devices must agree
    mask = example_inputs.get("attention_mask")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids) if mask is None else mask.to(device)}


def example_like(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Example inputs for capturing a causal LM at ``input_ids``' sequence length: at least two rows (a
    graph captured on one row would be specialised to batch 1), every position attended."""
    ids = input_ids if input_ids.shape[0] > 1 else input_ids.expand(2, -1)
    return {"input_ids": ids.contiguous(), "attention_mask": torch.ones_like(ids)}


def refusal(gm: fx.GraphModule, args: tuple = (), kwargs: dict | None = None) -> str | None:
    """Why ``gm`` would refuse the call ``gm(*args, **kwargs)``, or None.

    Where the model's code depends on a size (a Python loop over the tokens, padding to a chunk size),
    ``torch.export`` specialises the capture to the example's sizes and the graph checks its inputs against
    them first (its ``_guards_fn``, see ``ExportedProgram.module``): this runs those checks alone, which
    read only shapes, and returns the first failure's message.
    """
    guards = gm.graph.find_nodes(op="call_module", target="_guards_fn")
    if not guards:
        return None
    values = flat_inputs(gm, args, kwargs or {})
    placeholders = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], values))
    for node in guards:
        try:
            gm.get_submodule(node.target)(*(placeholders.get(arg) for arg in node.args))
        except AssertionError as error:
            return str(error)
    return None


def _dynamic_spec(leaf: Any):
    """Batch and sequence dims (the first two) are dynamic; export specialises any it must."""
    if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
        return None
    return {d: Dim.AUTO for d in range(min(leaf.dim(), 2))}


def _normalise_inputs(model: torch.nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        raise CaptureError(
            f"{type(model).__name__} is not a Hugging Face causal LM, so fxslice cannot invent inputs for it: "
            "pass example_inputs=(tensor, ...) or example_inputs={'name': tensor}"
        )
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: optree.tree_map(_dynamic_spec, value, none_is_leaf=True) for name, value in bound.arguments.items()}


def _drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """``_assert_tensor_metadata`` pins the capture's dtype and device; it checks nothing fxslice keeps."""
    for node in list(gm.graph.nodes):
        if is_op(node, aten._assert_tensor_metadata) and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _fold_linears_of_zeros(gm: fx.GraphModule) -> None:
    """``linear(zeros([..., d]), W, b)`` becomes ``zeros([..., out]) + b`` where ``W`` has other readers.

    A start state written this way (``proj(x.new_zeros(batch, 1, d))`` when no cache holds one) would
    otherwise be a second reader of ``W`` that slicing cannot narrow, so that ``W`` kept its width in a
    graph taking that branch and not in one that does not (the decoding graph).
    """
    readers: dict[str, int] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        readers[node.target] = readers.get(node.target, 0) + len(node.users)
    folded = False
    for node in list(gm.graph.nodes):
        source = node.args[0] if is_op(node, aten.linear) else None
        if not (is_op(source, aten.new_zeros) or is_op(source, aten.zeros)) or val(node) is None:
            continue
        if readers.get(getattr(node.args[1], "target", None), 0) < 2:
            continue  # the weight's only reader: nothing else to narrow with it (and its output may be a source)
        *kept, _ = source.args[1] if is_op(source, aten.new_zeros) else source.args[0]
        size = [*kept, val(node).shape[-1]]
        args = (source.args[0], size) if is_op(source, aten.new_zeros) else (size,)
        bias = node.args[2] if len(node.args) > 2 else None
        with gm.graph.inserting_before(node):
            result = gm.graph.call_function(source.target, args, dict(source.kwargs))
            result.meta = dict(node.meta)
            if bias is not None:
                result = gm.graph.call_function(aten.add.Tensor, (result, bias))
                result.meta = dict(node.meta)
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        folded = True
    if folded:  # (a graph nothing was folded in is left exactly as export made it)
        eliminate_dead_code(gm)
        gm.recompile()


def _expand_as_by_sizes(gm: fx.GraphModule) -> None:
    """``a.expand_as(b)`` becomes ``a.expand(b.size(0), …, -1)`` where ``a`` and ``b`` end in the same width.

    ``a.expand_as(stream)`` (a bias broadcast to the stream's shape before it is added) reads the stream
    for its shape, last dim included, so a rotation or a slice of the stream would have to reach ``a`` in
    the same way. Written with the other sizes only, the result's width is ``a``'s own: ``a`` is then a
    value written into the stream like any bias, and the stream is read only for its batch and token sizes.
    """
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.expand_as.default)):
        small, like = node.args
        small_val, like_val = val(small), val(like)
        if small_val is None or like_val is None or small_val.dim() == 0 or small_val.dim() > like_val.dim():
            continue
        if not isinstance(small_val.shape[-1], int) or small_val.shape[-1] != like_val.shape[-1]:
            continue
        with gm.graph.inserting_before(node):
            sizes = []
            for dim, size in enumerate(like_val.shape[:-1]):
                if isinstance(size, torch.SymInt):
                    size_node = gm.graph.call_function(aten.sym_size.int, (like, dim))
                    size_node.meta["val"] = size
                    size = size_node
                sizes.append(size)
            expanded = gm.graph.call_function(aten.expand.default, (small, [*sizes, -1]))
            expanded.meta = dict(node.meta)
        node.replace_all_uses_with(expanded)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _norm_factor_before_linear(gm: fx.GraphModule) -> None:
    """``linear(x, W) * r`` with ``r = rsqrt(mean(x²) + eps)`` (an RMS norm split around a bias-free linear)
    becomes ``linear(x * r, W)``: ``(xW)·r = (x·r)W`` for a factor per token, and ``x * r`` is then a norm
    the analysis reads like any other."""
    changed = False
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        for linear, factor in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if not (is_op(linear, aten.linear) and len(linear.args) == 2 and len(linear.users) == 1
                    and isinstance(factor, fx.Node) and val(factor) is not None
                    and isinstance(val(linear.args[0]), FakeTensor)):
                continue
            x = linear.args[0]
            with gm.graph.inserting_before(node):
                scaled = gm.graph.call_function(aten.mul.Tensor, (x, factor))
            if rms_normalised(scaled) is not x:
                gm.graph.erase_node(scaled)
                continue
            with val(x).fake_mode:
                scaled.meta["val"] = val(x) * val(factor)
            with gm.graph.inserting_before(node):
                moved = gm.graph.call_function(aten.linear.default, (scaled, linear.args[1]))
            moved.meta = dict(node.meta)
            node.replace_all_uses_with(moved)
            gm.graph.erase_node(node)
            gm.graph.erase_node(linear)
            changed = True
            break
    if changed:
        gm.graph.lint()
        gm.recompile()


def capture(model: torch.nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """Trace ``model`` into an ATen-level GraphModule with dynamic batch and sequence dimensions.

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs (nested
    structures are fine). For Hugging Face causal LMs it may be omitted. The model is traced in eval mode
    (dropout off) and left in the mode it was in.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"fxslice captures torch.nn.Module objects; got {type(model).__name__}")
    hf = is_hf_causal_lm(model)
    if hf:
        module: torch.nn.Module = _CausalLMCall(model)
        args, kwargs = (), _hf_example_inputs(model, example_inputs)
    else:
        module = model
        args, kwargs = _normalise_inputs(model, example_inputs)
    mode = _fake_mode(model)
    if mode is not None:  # parameters without data (fxslice.streaming): the inputs join their fake mode
        args, kwargs = optree.tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x,
                                       (args, kwargs), none_is_leaf=True)
    gm = export_graph(model, module, args, kwargs, _dynamic_shapes(module, args, kwargs), hf)
    if hf:
        set_plan(gm, dataclasses.replace(plan_of(gm), capture_length=int(kwargs["input_ids"].shape[1])))
    return gm


def _fake_mode(model: torch.nn.Module):
    """The ``FakeTensorMode`` of ``model``'s parameters when they are fake tensors, else None."""
    parameter = next(model.parameters(), None)
    return parameter.fake_mode if isinstance(parameter, FakeTensor) else None


def export_graph(model: torch.nn.Module, module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                 causal_lm: bool) -> fx.GraphModule:
    """``torch.export`` ``module`` (which calls ``model``, as ``module.model`` for a causal LM) in eval mode
    and tidy the result for the passes; the graph starts with an empty ``Plan``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:  # torch.export raises many types; all mean "could not capture"
        first = (str(error).strip().splitlines() or [""])[0][:400]
        hint = (
            "check that the model runs on these inputs in eval mode; for Hugging Face models pass "
            "example_inputs={'input_ids': ..., 'attention_mask': ...}; data-dependent Python control flow "
            "must be rewritten with torch.cond or removed"
        )
        raise CaptureError(
            f"could not capture {type(model).__name__} with torch.export ({type(error).__name__}: {first}). "
            f"What to try: {hint}."
        ) from error
    finally:
        model.train(was_training)
    gm = program.module()
    _drop_metadata_asserts(gm)
    _fold_linears_of_zeros(gm)
    _expand_as_by_sizes(gm)
    _norm_factor_before_linear(gm)
    set_plan(gm, Plan(model_class=f"{type(model).__module__}.{type(model).__qualname__}",
                      kind="causal_lm" if causal_lm else "module", module_prefix=HF_PREFIX if causal_lm else "",
                      parameters_before=unique_parameters(model)))
    return gm
