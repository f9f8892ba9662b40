"""Normalisation patterns over the last dimension, recognised by their ops.

Matched forms (each optionally followed by casts, a ``γ`` multiply and a ``β`` add, in any mix of dtypes):

* ``aten.layer_norm(x, [d], w, b, eps)``
* ``aten.rms_norm(x, [d], w, eps)`` (also fxslice's own weightless form, tagged in ``node.meta``)
* RMS norm written out: ``x * rsqrt(mean(x**2 or x*x, -1, keepdim) + eps)`` (or ``x * (…) ** -0.5``) or
  ``x / sqrt(…)`` (or ``x / (…) ** 0.5``)
* LayerNorm written out: the same on ``x - mean(x, -1, keepdim)``

``γ`` may be any constant expression of the parameters, so ``(1 + w)`` offset norms are the same match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..graph import CASTS, aten, constant_value, is_op, strip_casts, val
from .ops import last_dim

__all__ = ["FUSED_NORM", "FusedNorm", "Norm", "find_norms", "rms_normalised"]

FUSED_NORM = "fxslice.fused_norm"
"""``node.meta`` key on fxslice's weightless ``rms_norm`` nodes; the value is a ``FusedNorm``."""


@dataclass(frozen=True)
class FusedNorm:
    """A weightless RMS norm that must keep dividing by ``width`` (the unsliced stream width)."""

    width: int
    eps: float


@dataclass(frozen=True, eq=False)
class Norm:
    input: fx.Node
    output: fx.Node
    kind: str  # "layer" (subtracts the mean) or "rms"
    width: int
    eps: float
    weight: torch.Tensor | None  # effective γ, float64, shape [width]; None means all ones
    bias: torch.Tensor | None  # β, float64, shape [width]; None means zero
    readers: frozenset  # pattern nodes that take `input` as an operand
    fused: FusedNorm | None  # set on fxslice's canonical weightless form
    blocks: int = 1  # copies of the stream side by side in ``input`` (its last dim merged with others)


def _vector(value, width: int) -> torch.Tensor | None:
    """A constant that broadcasts along the last dim only, as a float64 vector of ``width``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((width,), float(value), dtype=torch.float64)
    if not isinstance(value, torch.Tensor):
        return None
    if value.numel() == 1:
        return torch.full((width,), float(value.reshape(())), dtype=torch.float64)
    if value.shape[-1] != width or value.numel() != width:
        return None
    return value.detach().reshape(width).to(torch.float64)


def _root(node: Any, power: float) -> bool:
    """``node`` is ``v ** power`` for ``power`` ±0.5, as ``sqrt``/``rsqrt`` or as ``pow``."""
    if is_op(node, aten.pow):
        return node.args[1] == power
    return is_op(node, aten.rsqrt if power < 0 else aten.sqrt)


def _rms_core(node: fx.Node):
    """x * rsqrt(mean(x²) + eps) or x / sqrt(mean(x²) + eps) -> (x, eps, readers, kind); casts may sit
    on the way (``x * rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)``)."""
    if is_op(node, aten.mul):
        pairs = [(node.args[0], strip_casts(node.args[1])), (node.args[1], strip_casts(node.args[0]))]
        pairs = [(x, r) for x, r in pairs if _root(r, -0.5)]
    elif is_op(node, aten.div):
        pairs = [(node.args[0], strip_casts(node.args[1]))] if _root(strip_casts(node.args[1]), 0.5) else []
    else:
        return None
    for x, root in pairs:
        shifted = root.args[0]
        if not is_op(shifted, aten.add):
            continue
        a, b = shifted.args[0], shifted.args[1]
        mean, eps = (a, b) if isinstance(b, (int, float)) else (b, a)
        if not (is_op(mean, aten.mean) and isinstance(eps, (int, float))):
            continue
        dims, keepdim = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
        square = mean.args[0]
        nd = val(square).dim() if val(square) is not None else 0
        if list(dims) not in ([-1], [nd - 1]) or not keepdim:
            continue
        y = square.args[0] if is_op(square, aten.pow, aten.mul, aten.square) else None
        squares_y = (is_op(square, aten.pow) and square.args[1] == 2) or is_op(square, aten.square) or (
            is_op(square, aten.mul) and square.args[1] is y)
        if not squares_y:
            continue
        if _same(y, x):
            centred = _centred(x)
            if centred is not None:
                # (x - mean(x)) * rsqrt(mean((x - mean(x))²) + eps): a LayerNorm written out.
                return centred[0], float(eps), centred[1] | {y}, "layer"
            return x, float(eps), frozenset({square, node}), "rms"
        if isinstance(y, fx.Node) and strip_casts(y) is strip_casts(x) and is_op(y, *CASTS):
            reader = y  # the cast on the squares' side that reads x itself
            while reader.args[0] is not x and is_op(reader.args[0], *CASTS):
                reader = reader.args[0]
            if reader.args[0] is x:
                return x, float(eps), frozenset({reader, node}), "rms"
    return None


def rms_normalised(node: fx.Node) -> fx.Node | None:
    """The value ``node`` normalises when it is an RMS norm written out (``x * rsqrt(mean(x²) + eps)`` and
    the like, without ``γ``), else None."""
    core = _rms_core(node)
    return core[0] if core is not None and core[3] == "rms" else None


def _same(a, b) -> bool:
    """The same node, or two nodes computing the same op on the same arguments (x - mean written twice)."""
    if a is b:
        return True
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "call_function"
            and a.target == b.target and a.args == b.args and a.kwargs == b.kwargs)


def _centred(c: fx.Node):
    """``c = x - mean(x, -1, keepdim=True)`` -> (x, the nodes that read x)."""
    if not is_op(c, aten.sub) or not is_op(c.args[1], aten.mean):
        return None
    x, mean = c.args[0], c.args[1]
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    nd = val(x).dim() if val(x) is not None else 0
    if mean.args[0] is not x or list(mean.args[1]) not in ([-1], [nd - 1]) or not keepdim:
        return None
    return x, frozenset({c, mean})


def _match_core(node: fx.Node):
    if is_op(node, aten.layer_norm):
        x, shape = node.args[0], node.args[1]
        weight = node.args[2] if len(node.args) > 2 else None
        bias = node.args[3] if len(node.args) > 3 else None
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        return x, shape, "layer", float(eps), weight, bias, frozenset({node}), None
    if is_op(node, aten.rms_norm):
        x, shape = node.args[0], node.args[1]
        weight = node.args[2] if len(node.args) > 2 else None
        eps = node.args[3] if len(node.args) > 3 else None
        if eps is None:
            eps = torch.finfo(val(x).dtype).eps
        return x, shape, "rms", float(eps), weight, None, frozenset({node}), node.meta.get(FUSED_NORM)
    core = _rms_core(node)
    if core is not None:
        x, eps, readers, kind = core
        return x, [last_dim(x)], kind, eps, None, None, readers, None
    return None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _extend(core_out: fx.Node, width: int, weight, bias):
    """Follow casts, one γ multiply and one β add after the normalisation itself."""
    out = core_out
    while (user := _single_user(out)) is not None:
        if is_op(user, *CASTS) and user.args[0] is out:
            out = user
            continue
        if is_op(user, aten.mul, aten.add) and len(user.args) == 2:
            other = user.args[1] if user.args[0] is out else user.args[0]
            vector = _vector(constant_value(other), width) if other is not out else None
            if vector is None:
                break
            if is_op(user, aten.mul):
                weight = vector if weight is None else weight * vector
                bias = None if bias is None else bias * vector
            else:
                bias = vector if bias is None else bias + vector
            out = user
            continue
        break
    return out, weight, bias


def find_norms(gm: fx.GraphModule) -> list[Norm]:
    """Every normalisation over the last dim in the graph (whatever it reads)."""
    norms = []
    for node in gm.graph.nodes:
        match = _match_core(node)
        if match is None:
            continue
        x, shape, kind, eps, weight_node, bias_node, readers, fused = match
        width = last_dim(x)
        if width is None or list(shape) != [width]:
            continue
        weight = bias = None
        if weight_node is not None:
            weight = _vector(constant_value(weight_node), width)
            if weight is None:
                continue
        if bias_node is not None:
            bias = _vector(constant_value(bias_node), width)
            if bias is None:
                continue
        out, weight, bias = _extend(node, width, weight, bias)
        norms.append(Norm(x, out, kind, width, eps, weight, bias, readers, fused))
    return norms
