"""Op roles, recognised by ATen op and argument pattern (never by module class or model name).

Two questions are answered here for any node:

* ``weight_use(node)``: does it read a parameter as a linear map (``aten.linear``; ``addmm``/``mm``/
  ``matmul`` against a ``[in, out]`` weight as in Conv1D layers; ``embedding``)? Then which weight axis
  meets its input features and which its output features.
* ``stream_step(node, operand)``: how does ``node`` treat the last (feature) dimension of ``operand``?
  It may *commute* with any rotation of that dimension (casts, views that keep it, dropout in eval mode,
  scaling by a scalar or a per-token factor, slicing other dims), *join* two streams (add / sub), only
  read its shape, or do something fxslice cannot rotate through (``None``).

Both are tables keyed by op schema name that users extend without editing fxslice:
``register_weight_op`` (an op that multiplies its input by a parameter) and ``register_stream_op`` (an op
that commutes with a rotation of the last dimension).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import torch
import torch.fx as fx

from ..graph import CASTS, aten, is_op, val

__all__ = [
    "SAME_VALUES",
    "ParamAxis",
    "ShapeLiteral",
    "Step",
    "StepKind",
    "WeightUse",
    "last_dim",
    "register_stream_op",
    "register_weight_op",
    "stream_step",
    "weight_use",
    "zeros_width",
]


@dataclass(frozen=True)
class ParamAxis:
    """One axis of one parameter (``get_attr`` target): the unit that rotation and slicing act on.

    ``blocks > 1``: the axis holds that many equal pieces side by side, each indexed by the same inner
    channels (a fused gate-and-up projection that the graph splits into its pieces)."""

    target: str
    axis: int
    blocks: int = 1


@dataclass(frozen=True)
class WeightUse:
    """``node`` multiplies its ``input`` by the parameter ``weight`` (and adds ``bias``).

    ``in_axis`` is the weight axis contracted with the input's last dim (None for embeddings, whose
    input is an index); ``out_axis`` is the weight axis that becomes the output's last dim.
    """

    node: fx.Node
    kind: str
    input: fx.Node | None
    weight: str
    in_axis: int | None
    out_axis: int
    bias: str | None = None
    bias_axis: int = 0
    weight_arg: int = 1  # index of the weight operand in node.args
    groups: fx.Node | None = None  # a grouped matmul's offsets: rows [offsets[e-1], offsets[e]) use weight[e]

    def input_side(self) -> ParamAxis:
        assert self.in_axis is not None
        return ParamAxis(self.weight, self.in_axis)

    def output_side(self) -> tuple[ParamAxis, ...]:
        sides = (ParamAxis(self.weight, self.out_axis),)
        return sides + ((ParamAxis(self.bias, self.bias_axis),) if self.bias else ())


@dataclass(frozen=True)
class ShapeLiteral:
    """``node.args[arg][index]`` (``node.args[arg]`` when ``index`` is None) is the stream width written
    into the graph as a constant."""

    node: fx.Node
    arg: int
    index: int | None


class StepKind(Enum):
    COMMUTES = "commutes"
    JOINS = "joins"
    READS_SHAPE = "reads shape"  # only metadata: a size of another dim, or the dtype
    MERGES = "merges"  # the last dim joined with the dims before it: copies of the stream side by side


@dataclass(frozen=True)
class Step:
    kind: StepKind
    literal: ShapeLiteral | None = None
    blocks: int = 1  # MERGES: how many copies of the stream the merged last dim holds


# Ops whose output holds the same values as their first operand (up to dtype).
SAME_VALUES = CASTS + (aten.clone, aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy)


def last_dim(node: Any) -> int | None:
    """The static size of ``node``'s last dimension, or None (symbolic, scalar or unknown)."""
    v = val(node)
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return None
    size = v.shape[-1]
    return size if isinstance(size, int) else None


def _ndim(node: Any) -> int:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _resolve_weight(node: Any) -> tuple[str, tuple[int, ...]] | None:
    """Follow a weight operand back through casts, transposes and selects to its parameter.

    Returns the get_attr target and, for each axis of the operand, the parameter axis it shows.
    """
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target, tuple(range(_ndim(node)))
    if node.op != "call_function" or len(node.users) != 1 or not node.args:
        return None
    inner = _resolve_weight(node.args[0])
    if inner is None:
        return None
    target, axes = inner
    nd = len(axes)
    if is_op(node, *SAME_VALUES):
        return target, axes
    if is_op(node, aten.t, aten.numpy_T):
        return target, axes[::-1]
    if is_op(node, aten.transpose):
        a, b = _norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)
        swapped = list(axes)
        swapped[a], swapped[b] = swapped[b], swapped[a]
        return target, tuple(swapped)
    if is_op(node, aten.permute):
        return target, tuple(axes[_norm_dim(d, nd)] for d in node.args[1])
    if is_op(node, aten.select) and isinstance(node.args[1], int):
        # one expert's matrix of a 3-D weight: a rotation of a matrix axis applies to every expert alike
        return target, tuple(a for i, a in enumerate(axes) if i != _norm_dim(node.args[1], nd))
    return None


WeightMatcher = Callable[[fx.Node], "WeightUse | None"]
_WEIGHT_OPS: dict[str, WeightMatcher] = {}


def register_weight_op(*op_names: str):
    """Teach fxslice a new op that multiplies its input by a parameter.

    ``op_names`` are schema names (``"aten::linear"``, ``"mylib::fused_mm"``); the decorated function
    returns a ``WeightUse`` for a matching node, or None when the node does not read a parameter.
    """

    def register(matcher: WeightMatcher) -> WeightMatcher:
        for name in op_names:
            _WEIGHT_OPS[name] = matcher
        return matcher

    return register


def _op_name(node: fx.Node) -> str | None:
    schema = getattr(node.target, "_schema", None)
    return schema.name if schema is not None else None


def weight_use(node: fx.Node) -> WeightUse | None:
    """How ``node`` reads a parameter as a linear map, if it does (see ``register_weight_op``)."""
    if node.op != "call_function":
        return None
    matcher = _WEIGHT_OPS.get(_op_name(node) or "")
    return matcher(node) if matcher is not None else None


def _bias(node: Any) -> tuple[str, int] | None:
    resolved = _resolve_weight(node)
    return (resolved[0], resolved[1][-1]) if resolved is not None and resolved[1] else None


@register_weight_op("aten::linear")
def _linear(node: fx.Node) -> WeightUse | None:
    """``y = x Wᵀ + b`` with ``W`` of shape ``[out, in]``."""
    args = node.args
    weight = _resolve_weight(args[1])
    has_bias = len(args) > 2 and args[2] is not None
    bias = _bias(args[2]) if has_bias else None
    if weight is None or len(weight[1]) != 2 or (has_bias and bias is None):
        return None
    axes = weight[1]
    return WeightUse(node, "linear", args[0], weight[0], axes[1], axes[0], *(bias or (None, 0)), weight_arg=1)


@register_weight_op("aten::addmm")
def _addmm(node: fx.Node) -> WeightUse | None:
    """``y = b + x W`` with ``W`` of shape ``[in, out]`` (Conv1D layers)."""
    args = node.args
    weight, bias = _resolve_weight(args[2]), _bias(args[0])
    if weight is None or bias is None or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    axes = weight[1]
    return WeightUse(node, "addmm", args[1], weight[0], axes[0], axes[1], *bias, weight_arg=2)


@register_weight_op("aten::mm", "aten::matmul", "aten::_grouped_mm", "transformers::grouped_mm_fallback")
def _matmul(node: fx.Node) -> WeightUse | None:
    """``y = x W`` with ``W`` of shape ``[…, in, out]`` (per-expert weights for grouped matmuls, whose
    third operand ``offs`` splits the rows by expert)."""
    weight = _resolve_weight(node.args[1])
    grouped = "grouped" in (_op_name(node) or "")
    if weight is None or len(weight[1]) < 2 or (len(weight[1]) > 2 and not grouped):
        return None
    axes = weight[1]
    offsets = (node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")) if grouped else None
    return WeightUse(node, "matmul", node.args[0], weight[0], axes[-2], axes[-1], weight_arg=1,
                     groups=offsets if isinstance(offsets, fx.Node) else None)


@register_weight_op("aten::bmm")
def _bmm(node: fx.Node) -> WeightUse | None:
    """``y[e] = x[e] W[e]`` with ``W`` of shape ``[E, in, out]``: experts batched along the first dim."""
    weight = _resolve_weight(node.args[1])
    if weight is None or len(weight[1]) != 3 or weight[1][0] != 0:
        return None
    return WeightUse(node, "matmul", node.args[0], weight[0], weight[1][1], weight[1][2], weight_arg=1)


@register_weight_op("aten::embedding")
def _embedding(node: fx.Node) -> WeightUse | None:
    """Rows of ``W`` of shape ``[vocab, d]`` looked up by index."""
    weight = _resolve_weight(node.args[0])
    if weight is None or weight[1] != (0, 1):
        return None
    return WeightUse(node, "embedding", None, weight[0], None, 1, weight_arg=0)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _is_scalar_like(x: Any) -> bool:
    """A Python number or a one-element tensor: scaling by it commutes with any rotation."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    v = val(x)
    return isinstance(v, torch.Tensor) and v.numel() == 1


def _is_per_token(x: Any) -> bool:
    """A tensor whose last dim is 1: it scales whole feature vectors, so it commutes too."""
    v = val(x)
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == 1


def _shape_step(node: fx.Node, operand: fx.Node, shape_arg: int) -> Step | None:
    """view / reshape / expand keep the stream when the output's last dim is the operand's last dim."""
    width = last_dim(operand)
    if width is None or last_dim(node) != width:
        return None
    shape = node.args[shape_arg]
    if not isinstance(shape, (list, tuple)) or not shape:
        return None
    tail = shape[-1]
    if isinstance(tail, int) and tail == width:
        return Step(StepKind.COMMUTES, ShapeLiteral(node, shape_arg, len(shape) - 1))
    if isinstance(tail, int) and tail == -1:
        return Step(StepKind.COMMUTES)
    return None


StreamRule = Callable[[fx.Node, fx.Node], "Step | None"]
_STREAM_OPS: dict[str, StreamRule] = {}


def _stream_rule(*packets):
    """Register a rule for the built-in ops in ``packets`` (ATen overload packets, all their overloads)."""

    def register(rule: StreamRule) -> StreamRule:
        for packet in packets:
            _STREAM_OPS[packet._qualified_op_name] = rule
        return rule

    return register


def register_stream_op(*op_names: str, rule: Callable[[fx.Node, fx.Node], bool] | None = None) -> None:
    """Teach fxslice an op that carries the residual stream: it commutes with a rotation of the last dim.

    ``op_names`` are schema names (``"mylib::token_scale"``). Declared so, ``op(x·Q, …) = op(x, …)·Q``
    for every orthogonal ``Q`` when the stream ``x`` is its first argument and its output keeps ``x``'s
    last dimension (a per-token scale, an activation checkpoint, a communication op that moves whole
    tokens), so fxslice folds rotations across it and slices through it. ``rule(node, operand)``, if
    given, decides per node instead (True: it commutes in ``operand``).
    """

    def declared(node: fx.Node, operand: fx.Node) -> Step | None:
        if rule is not None:
            return Step(StepKind.COMMUTES) if rule(node, operand) else None
        keeps_width = last_dim(node) is not None and last_dim(node) == last_dim(operand)
        return Step(StepKind.COMMUTES) if node.args and node.args[0] is operand and keeps_width else None

    for name in op_names:
        if "::" not in name:
            raise ValueError(f"register_stream_op takes schema names like 'mylib::op'; got {name!r}")
        _STREAM_OPS[name] = declared


def stream_step(node: fx.Node, operand: fx.Node) -> Step | None:
    """How ``node`` treats the last dimension of its input ``operand`` (None: cannot rotate through)."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:  # one piece of a split along another dim than the last
        return Step(StepKind.COMMUTES) if is_op(operand, aten.split, aten.split_with_sizes) else None
    rule = _STREAM_OPS.get(_op_name(node) or "")
    return rule(node, operand) if rule is not None else None


def _on_data(rule: StreamRule) -> StreamRule:
    """Only the data operand (the first argument) may carry the stream."""
    return lambda node, operand: rule(node, operand) if node.args and node.args[0] is operand else None


def _commutes(node: fx.Node, operand: fx.Node) -> Step:
    return Step(StepKind.COMMUTES)


_stream_rule(*SAME_VALUES, aten.neg)(_on_data(_commutes))


@_stream_rule(aten.sym_size)
def _sym_size(node: fx.Node, operand: fx.Node) -> Step | None:
    nd = _ndim(operand)
    if node.args[0] is operand and _norm_dim(node.args[1], nd) != nd - 1:
        return Step(StepKind.READS_SHAPE)
    return None


@_stream_rule(aten.new_zeros, aten.new_ones, aten.new_full, aten.new_empty)
def _new_tensor(node: fx.Node, operand: fx.Node) -> Step | None:
    """``x.new_zeros(size)``: the size is given, so only ``x``'s dtype and device are read."""
    return Step(StepKind.READS_SHAPE) if node.args[0] is operand else None


_stream_rule(aten.zeros_like)(_on_data(_commutes))  # 0·Q = 0, at any width


@_stream_rule(aten.type_as)
def _type_as(node: fx.Node, operand: fx.Node) -> Step | None:
    if node.args[0] is operand:
        return Step(StepKind.COMMUTES)  # a cast
    return Step(StepKind.READS_SHAPE) if node.args[1] is operand else None  # type_as(y, x) reads only x's dtype


def zeros_width(node: fx.Node) -> ShapeLiteral | None:
    """Where ``node`` makes a tensor of zeros ending in the stream's width (``zeros(size)``,
    ``x.new_zeros(size)``): that width, written into the graph. Zeros rotate to zeros (0·Q = 0) and slice
    to zeros, so such a tensor may start a stream value (the accumulator experts are added into)."""
    if is_op(node, aten.zeros):
        arg = 0
    elif is_op(node, aten.new_zeros):
        arg = 1
    else:
        return None
    size = node.args[arg] if len(node.args) > arg else None
    if not isinstance(size, (list, tuple)) or not size or not isinstance(size[-1], int) or size[-1] != last_dim(node):
        return None
    return ShapeLiteral(node, arg, len(size) - 1)


@_stream_rule(aten.index_add, aten.index_add_)
def _index_add(node: fx.Node, operand: fx.Node) -> Step | None:
    """``index_add(acc, dim, index, rows)``: ``acc`` plus ``rows`` added at the indexed positions of another
    dim, a sum of feature vectors, so it joins the two like an add (experts' outputs added per token)."""
    acc, dim, rows = node.args[0], node.args[1], node.args[3] if len(node.args) > 3 else None
    if operand not in (acc, rows) or not isinstance(dim, int) or _norm_dim(dim, _ndim(acc)) == _ndim(acc) - 1:
        return None
    if is_op(node, aten.index_add_) and len(acc.users) > 1:
        return None  # in place into a value also read elsewhere: order would matter
    return Step(StepKind.JOINS) if last_dim(acc) == last_dim(rows) == last_dim(node) else None


@_stream_rule(aten.cat, aten.concatenate)
def _cat(node: fx.Node, operand: fx.Node) -> Step | None:
    """``cat(values, dim)`` along another dim than the last: whole feature vectors side by side (the rows of
    every expert's output put together), each rotated alike, so it joins them. Along the last dim, stream
    values of one width merge into one vector (``MERGES``)."""
    values = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(values, (list, tuple)) or operand not in values or not isinstance(dim, int):
        return None
    if _norm_dim(dim, _ndim(operand)) == _ndim(operand) - 1:
        # Along the last dim: values of the stream side by side, merged as a view merges copies (the pieces
        # are then held to one rotation).
        width = last_dim(operand)
        if width is None or any(last_dim(v) != width for v in values) or last_dim(node) != width * len(values):
            return None
        return Step(StepKind.MERGES, blocks=len(values))
    return Step(StepKind.JOINS) if all(last_dim(v) == last_dim(node) for v in values) else None


@_stream_rule(aten.add, aten.sub, aten.add_, aten.sub_)
def _join(node: fx.Node, operand: fx.Node) -> Step | None:
    first, args = node.args[0], node.args
    if is_op(node, aten.add_, aten.sub_) and first is operand and len(operand.users) > 1:
        return None  # an in-place add whose target is also read elsewhere: order would matter
    if first is operand and not isinstance(args[1], fx.Node) and args[1] == 0:
        return Step(StepKind.COMMUTES)  # x + 0 = x (models that add an absent position embedding as 0)
    if isinstance(args[1], fx.Node) and first is not None:
        other = args[1] if first is operand else first
        if last_dim(other) == last_dim(operand) and last_dim(node) == last_dim(operand):
            return Step(StepKind.JOINS)
    return None


@_stream_rule(aten.mul, aten.mul_)
def _mul(node: fx.Node, operand: fx.Node) -> Step | None:
    first, other = node.args[0], node.args[1] if len(node.args) > 1 else None
    if is_op(node, aten.mul_) and (first is not operand or len(operand.users) > 1):
        return None  # in place: only on the stream itself, and only where nothing else reads it before
    factor = other if first is operand else first if other is operand else operand
    return Step(StepKind.COMMUTES) if factor is not operand and (_is_scalar_like(factor) or _is_per_token(factor)) else None


@_stream_rule(aten.div)
@_on_data
def _div(node: fx.Node, operand: fx.Node) -> Step | None:
    other = node.args[1] if len(node.args) > 1 else None
    return Step(StepKind.COMMUTES) if _is_scalar_like(other) or _is_per_token(other) else None


@_stream_rule(aten.dropout)
@_on_data
def _dropout(node: fx.Node, operand: fx.Node) -> Step | None:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return Step(StepKind.COMMUTES) if train is False else None


@_stream_rule(aten.masked_fill)
@_on_data
def _masked_fill(node: fx.Node, operand: fx.Node) -> Step | None:
    return Step(StepKind.COMMUTES) if node.args[2] == 0 and _is_per_token(node.args[1]) else None


@_stream_rule(aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.flatten)
@_on_data
def _reshape(node: fx.Node, operand: fx.Node) -> Step | None:
    merged = _merge_step(node, operand)
    if merged is not None:
        return merged
    if is_op(node, aten.flatten):  # flatten(x, start, end) over dims before the last keeps whole vectors
        end = node.args[2] if len(node.args) > 2 else -1
        return Step(StepKind.COMMUTES) if _norm_dim(end, _ndim(operand)) != _ndim(operand) - 1 else None
    return _shape_step(node, operand, 1)


def _merge_step(node: fx.Node, operand: fx.Node) -> Step | None:
    """``[…, n, d] → […, n·d]`` (a view or flatten that joins the last dim with the ones before it, as
    hyper-connections flatten their ``n`` copies of the stream): each copy rotated by ``Q`` is the merged
    vector rotated by ``diag(Q, …, Q)``, which a norm over the whole merged vector commutes with and the
    linears reading it take in ``n`` blocks. Only where the merged width is not written into the graph."""
    source, out, width = val(operand), val(node), last_dim(operand)
    if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor) or width is None:
        return None
    merged = source.dim() - out.dim() + 1  # trailing dims of the operand that become the last one
    if merged < 2 or any(not isinstance(n, int) for n in source.shape[-merged:]):
        return None
    if [str(n) for n in source.shape[:-merged]] != [str(n) for n in out.shape[:-1]]:
        return None
    if last_dim(node) != width * (blocks := math.prod(source.shape[-merged:]) // width):
        return None
    if not is_op(node, aten.flatten) and node.args[1][-1] != -1:
        return None  # the merged width written into the graph: slicing would have to rewrite it as blocks × k
    return Step(StepKind.MERGES, blocks=blocks)


@_stream_rule(aten.slice, aten.select, aten.squeeze, aten.index_select, aten.narrow)
@_on_data
def _other_dims(node: fx.Node, operand: fx.Node) -> Step | None:
    nd = _ndim(operand)
    dims = node.args[1] if len(node.args) > 1 else None
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if any(d is None or not isinstance(d, int) or _norm_dim(d, nd) == nd - 1 for d in dims):
        return None
    return Step(StepKind.COMMUTES)


@_stream_rule(aten.split, aten.split_with_sizes)
@_on_data
def _split(node: fx.Node, operand: fx.Node) -> Step | None:
    """Pieces along another dim than the last (the rows routed to each expert): each keeps whole vectors."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return Step(StepKind.COMMUTES) if isinstance(dim, int) and _norm_dim(dim, _ndim(operand)) != _ndim(operand) - 1 else None


@_stream_rule(aten.repeat)
@_on_data
def _repeat(node: fx.Node, operand: fx.Node) -> Step | None:
    """Copies of whole feature vectors (the tokens repeated once per expert): the last dim repeated once."""
    repeats = node.args[1] if len(node.args) > 1 else None
    if not isinstance(repeats, (list, tuple)) or len(repeats) < _ndim(operand) or repeats[-1] != 1:
        return None
    return Step(StepKind.COMMUTES)


@_stream_rule(aten.repeat_interleave)
@_on_data
def _repeat_interleave(node: fx.Node, operand: fx.Node) -> Step | None:
    """Each vector repeated along another dim (a token once per route it takes): whole feature vectors."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    nd = _ndim(operand)
    return Step(StepKind.COMMUTES) if isinstance(dim, int) and _norm_dim(dim, nd) != nd - 1 else None


@_stream_rule(aten.sum, aten.mean)
@_on_data
def _reduce(node: fx.Node, operand: fx.Node) -> Step | None:
    # Reducing over other dims (e.g. over the top-k experts) is linear in each feature vector.
    nd, dims = _ndim(operand), node.args[1] if len(node.args) > 1 else None
    if isinstance(dims, (list, tuple)) and all(_norm_dim(d, nd) != nd - 1 for d in dims):
        return Step(StepKind.COMMUTES)
    return None


@_stream_rule(aten.unsqueeze)
@_on_data
def _unsqueeze(node: fx.Node, operand: fx.Node) -> Step | None:
    out_nd = _ndim(operand) + 1
    return Step(StepKind.COMMUTES) if _norm_dim(node.args[1], out_nd) != out_nd - 1 else None


@_stream_rule(aten.transpose)
@_on_data
def _transpose(node: fx.Node, operand: fx.Node) -> Step | None:
    nd = _ndim(operand)
    return Step(StepKind.COMMUTES) if nd - 1 not in (_norm_dim(node.args[1], nd), _norm_dim(node.args[2], nd)) else None


@_stream_rule(aten.permute)
@_on_data
def _permute(node: fx.Node, operand: fx.Node) -> Step | None:
    return Step(StepKind.COMMUTES) if _norm_dim(node.args[1][-1], _ndim(operand)) == _ndim(operand) - 1 else None


@_stream_rule(aten.matmul, aten.bmm)
def _mix_other_dim(node: fx.Node, operand: fx.Node) -> Step | None:
    """``A @ x`` with the stream on the right: each output vector a combination of whole feature vectors
    along another dim (hyper-connections mix their copies of the stream so), ``A (x Q) = (A x) Q``."""
    if len(node.args) < 2 or node.args[1] is not operand or node.args[0] is operand:
        return None
    if _ndim(operand) < 2 or _ndim(node.args[0]) < 2 or last_dim(node) != last_dim(operand):
        return None
    return Step(StepKind.COMMUTES)


@_stream_rule(aten.index)
@_on_data
def _index(node: fx.Node, operand: fx.Node) -> Step | None:
    return Step(StepKind.COMMUTES) if len(node.args[1]) < _ndim(operand) else None
