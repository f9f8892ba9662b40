"""Graph and weight edits shared by the passes. Weight math runs in float64 and is cast back.

Every edit of a weight acts on one axis of one parameter (a ``ParamAxis``), which is what makes the
passes independent of the op that reads the weight: a linear's output side is axis 0 of ``[out, in]``,
a Conv1D's output side is axis 1 of ``[in, out]``, an embedding's is axis 1 of ``[vocab, d]``, and
``P ×ₐ M`` (multiply axis ``a`` of ``P`` on the right by ``M``) is the one operation they all need:

* output side, ``W ← WQ`` in the math's row-vector convention, is ``P ×ₐ Q`` on the output axis;
* input side, ``W ← QᵀW``, is ``P ×ₐ Q`` on the input axis as well, since ``(xQ)(QᵀW) = xW``.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .analysis.norms import FUSED_NORM, FusedNorm, Norm
from .analysis.ops import ParamAxis
from .analysis.regions import State
from .errors import UnsupportedGraphError
from .graph import add_parameter, aten, get_tensor, set_tensor, strip_casts, val

__all__ = [
    "emit_norm",
    "insert_linear",
    "multiply_axis",
    "narrow_axis",
    "rotate_state",
    "scale_axis",
    "scale_normed_sinks",
    "select_axis",
    "slice_state",
    "write_width",
]


_CHUNK = 1 << 22
"""Elements of float64 work per step of ``multiply_axis``: bounds the transient memory of big weights
(a 49152 × 576 embedding is 226 MB in float64; rotating it whole would hold two such copies at once)."""


def multiply_axis(gm: fx.GraphModule, side: ParamAxis, matrix: torch.Tensor) -> None:
    """``P ×ₐ M``: axis ``a`` of the parameter (size m) becomes ``(… m) @ M`` (size ``M.shape[1]``).

    Computed in float64, a block of rows at a time, and written straight into the result in the
    parameter's dtype and layout: besides the parameter and its result, only a block is ever held.
    """
    tensor = get_tensor(gm, side.target).detach()
    wide = matrix.to(device=tensor.device, dtype=torch.float64)
    if side.blocks > 1:  # diag(M, …, M): each of the axis's pieces times M (weights that read merged copies)
        pieces = torch.movedim(tensor, side.axis, -1).unflatten(-1, (side.blocks, -1)).to(torch.float64) @ wide
        set_tensor(gm, side.target, torch.movedim(pieces.flatten(-2), -1, side.axis).to(tensor.dtype).contiguous())
        return
    shape = list(tensor.shape)
    shape[side.axis] = wide.shape[1]
    out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    if tensor.dim() == 2:  # views with the axis last, of the parameter and of the result: no copies
        rows, into = torch.movedim(tensor, side.axis, -1), torch.movedim(out, side.axis, -1)
    else:
        rows = torch.movedim(tensor, side.axis, -1).reshape(-1, tensor.shape[side.axis])
        into = torch.empty(rows.shape[0], wide.shape[1], dtype=tensor.dtype, device=tensor.device)
    step = max(1, _CHUNK // max(wide.shape))
    for start in range(0, rows.shape[0], step):
        into[start : start + step] = rows[start : start + step].to(torch.float64) @ wide
    if tensor.dim() != 2:
        moved = torch.movedim(tensor, side.axis, -1).shape
        out = torch.movedim(into.reshape(*moved[:-1], wide.shape[1]), -1, side.axis).contiguous()
    set_tensor(gm, side.target, out)


def scale_axis(gm: fx.GraphModule, side: ParamAxis, vector: torch.Tensor) -> None:
    """``P ×ₐ diag(v)``, without building the diagonal matrix (in float64, a block of rows at a time)."""
    tensor = get_tensor(gm, side.target).detach()
    shape = [1] * tensor.dim()
    shape[side.axis] = -1
    wide = vector.to(device=tensor.device, dtype=torch.float64).reshape(shape)
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    step = max(1, _CHUNK // max(1, tensor[0].numel()))
    for start in range(0, tensor.shape[0], step):
        block = wide[start : start + step] if side.axis == 0 else wide
        out[start : start + step] = tensor[start : start + step].to(torch.float64) * block
    set_tensor(gm, side.target, out)


def narrow_axis(gm: fx.GraphModule, side: ParamAxis, width: int) -> None:
    """Keep the first ``width`` entries of the axis (of each of its blocks): the principal directions
    after rotation."""
    tensor = get_tensor(gm, side.target)
    if tensor.shape[side.axis] != width * side.blocks:  # rotate_state may have narrowed it already
        select_axis(gm, side, torch.arange(width))


def select_axis(gm: fx.GraphModule, side: ParamAxis, index: torch.Tensor) -> None:
    """Keep the entries ``index`` of the axis (of each of its blocks), in that order (channels of an inner
    width). A 2-D ``index`` chooses for each slice of the parameter's first axis (an expert) its own
    entries: ``index[e]`` for ``P[e]``."""
    tensor = get_tensor(gm, side.target).detach()
    index = index.to(tensor.device)
    piece = tensor.shape[side.axis] // side.blocks
    index = torch.cat([index + b * piece for b in range(side.blocks)], -1)  # the same channels in every block
    if index.dim() == 1:
        set_tensor(gm, side.target, tensor.index_select(side.axis, index).contiguous())
        return
    assert side.axis != 0 and index.shape[0] == tensor.shape[0], (side, tuple(index.shape))
    set_tensor(gm, side.target, torch.stack([t.index_select(side.axis - 1, i) for t, i in zip(tensor, index)]))


def write_width(literals, width: int) -> None:
    """Every ``ShapeLiteral`` (a width written into a view's shape or a split's sizes) becomes ``width``."""
    for literal in literals:
        args = list(literal.node.args)
        if literal.index is None:
            args[literal.arg] = width
        else:
            shape = list(args[literal.arg])
            shape[literal.index] = width
            args[literal.arg] = shape
        literal.node.args = tuple(args)


def _copy_meta(new: fx.Node, like: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            new.meta[key] = like.meta[key]


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, like: fx.Node) -> fx.Node:
    if val(node) is not None and val(node).dtype == dtype:
        return node
    cast = graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
    _copy_meta(cast, like)
    return cast


def emit_norm(gm: fx.GraphModule, norm: Norm, kind: str, reader: bool = True, in_stream: bool = False) -> fx.Node:
    """Insert the weightless form of ``norm`` before its output and return the new output node.

    ``kind="rms"``: ``x / sqrt(Σx²/d + eps)``, tagged with the width ``d`` it must keep dividing by once
    the stream is sliced (``reader``: it reads a residual stream). ``kind="layer"``: ``layer_norm`` without
    affine parameters. ``in_stream``: a norm whose output stays in the stream (``Norm.commutes``), written
    out as ``x·rsqrt(Σx²·(1/d) + eps)·γ`` with ``d`` a constant and ``γ`` its one number, so that the
    sliced stream keeps dividing by ``d`` with nothing to rewrite. Computed in at least float32 and at
    least the precision of the stream itself; cast to the original output dtype.
    """
    graph = gm.graph
    source = strip_casts(norm.input)
    compute = torch.promote_types(val(source).dtype, torch.float32)
    with graph.inserting_before(norm.output):
        x = _cast(graph, source, compute, norm.output)
        if in_stream:
            squares = graph.call_function(aten.mul.Tensor, (x, x))
            total = graph.call_function(aten.sum.dim_IntList, (squares, [-1], True))
            mean = graph.call_function(aten.mul.Tensor, (total, 1.0 / norm.width))
            factor = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (mean, norm.eps)),))
            y = graph.call_function(aten.mul.Tensor, (x, factor))
            y.meta[FUSED_NORM] = FusedNorm(norm.width, norm.eps, in_stream=True)
            gain = float(norm.weight[0]) if norm.weight is not None else 1.0
            for node in (squares, total, mean, factor.args[0], factor, y):
                _copy_meta(node, norm.output)
            if gain != 1.0:
                y = graph.call_function(aten.mul.Tensor, (y, gain))
                _copy_meta(y, norm.output)
        elif kind == "rms":
            y = graph.call_function(aten.rms_norm.default, (x, [norm.width], None, norm.eps))
            if reader:
                y.meta[FUSED_NORM] = FusedNorm(norm.width, norm.eps)
        else:
            y = graph.call_function(aten.layer_norm.default, (x, [norm.width], None, None, norm.eps))
        _copy_meta(y, norm.output)
        out = _cast(graph, y, val(norm.output).dtype, norm.output)
    return out


def insert_linear(
    gm: fx.GraphModule, x: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None, hint: str, like: fx.Node
) -> fx.Node:
    """Insert ``linear(x, weight, bias)`` right after ``x``'s definition point, before ``like``."""
    w = add_parameter(gm, hint + "_weight", weight, before=like)
    b = add_parameter(gm, hint + "_bias", bias, before=like) if bias is not None else None
    with gm.graph.inserting_before(like):
        node = gm.graph.call_function(aten.linear.default, (x, w) if b is None else (x, w, b))
    _copy_meta(node, like)
    return node


def rotate_state(gm: fx.GraphModule, state: State, rotation: torch.Tensor) -> None:
    """Fold ``Q`` into every weight axis bound to ``state``: sources ``W ← WQ``, sinks ``W ← QᵀW``.

    ``Q`` may be the first ``k`` columns of a ``d × d`` rotation: the axes then come out ``k`` wide, as
    ``slice_state`` would leave them, at ``k/d`` of the work."""
    for side, _ in state.param_axes():
        multiply_axis(gm, side, rotation)


def slice_state(gm: fx.GraphModule, state: State, width: int) -> None:
    """Keep the first ``width`` directions of a rotated state.

    Sources lose output columns and sinks input rows; widths written into the graph follow. Each norm
    that reads the state keeps dividing by the unsliced width ``d``: with ``rms_k`` over ``k`` features,
    ``x / sqrt(Σx²/d + eps) = sqrt(d/k) · rms_k(x; eps·d/k)``, so the norm gets ``eps·d/k`` and its sinks
    absorb the factor ``sqrt(d/k)``.
    """
    if width == state.width:
        return
    for side, _ in state.param_axes():
        narrow_axis(gm, side, width)
    write_width(state.literals, width)
    for norm in state.norms:
        if norm.fused is None:
            raise UnsupportedGraphError(f"cannot slice a stream read by a norm that fuse_norm has not rewritten: "
                                        f"{norm.output.format_node()}")
        if norm.fused.in_stream:
            continue  # it divides by the constant d already
        (node,) = norm.readers
        kept = width * norm.blocks  # a norm over n merged copies of the stream: n·d before, n·k after
        node.args = (node.args[0], [kept], None, norm.fused.eps * norm.fused.width / kept)
        # rms over d = sqrt(d/k) · rms over k (with eps·d/k): the norm's sinks take the factor.
        scale_normed_sinks(gm, state, math.sqrt(norm.fused.width / kept), norm)


def scale_normed_sinks(gm: fx.GraphModule, state: State, factor: float, norm: Norm | None = None,
                       skip: frozenset = frozenset()) -> int:
    """Multiply the input side of every sink that reads ``state`` through a norm (only ``norm``'s, if
    given; none whose node is in ``skip``) by ``factor``: the same as scaling that norm's output.
    Returns how many weights were scaled."""
    scaled = set()
    for sink in state.sinks:
        side = sink.side()
        if sink.norm is not None and (norm is None or sink.norm is norm) and sink.use.node not in skip and side not in scaled:
            scaled.add(side)
            tensor = get_tensor(gm, side.target)
            scale_axis(gm, side, torch.full((tensor.shape[side.axis],), factor, dtype=torch.float64))
    return len(scaled)
