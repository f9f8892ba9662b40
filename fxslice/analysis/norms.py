"""Normalisation patterns over the last dimension, recognised by their ops.

Matched forms (each optionally followed by casts, a ``γ`` multiply and a ``β`` add, in any mix of dtypes):

* ``aten.layer_norm(x, [d], w, b, eps)``
* ``aten.rms_norm(x, [d], w, eps)`` (also fxslice's own weightless form, tagged in ``node.meta``)
* RMS norm written out: ``x * rsqrt(mean(x**2 or x*x, -1, keepdim) + eps)`` (or ``x * (…) ** -0.5``) or
  ``x / sqrt(…)`` (or ``x / (…) ** 0.5``); ``mean`` may also be a sum times a constant ``f`` (an L2 norm:
  ``f = 1``), since ``x·rsqrt(f·Σx² + eps) = (fd)^-½ · x·rsqrt(mean(x²) + eps/(fd))``
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
    """A weightless RMS norm that must keep dividing by ``width`` (the unsliced stream width). ``in_stream``:
    written out as ``x·rsqrt(Σx²/width + eps)``, with ``width`` a constant, for a norm whose output stays
    in the stream; slicing leaves it as it is."""

    width: int
    eps: float
    in_stream: bool = False


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
    uniform: bool = True  # γ is one number for every feature (or absent)
    scaling: fx.Node | None = None  # the op multiplying ``input`` by its per-token factor (not fxslice's own)
    affine: str = ""  # how γ and β are computed (``expression``): equal for norms that apply the same ones

    @property
    def commutes(self) -> bool:
        """``norm(xQ) = norm(x)Q`` for every orthogonal ``Q``: an RMS norm without a per-feature ``γ`` or ``β``
        is ``x`` times a number per token that ``Q`` does not change (``‖xQ‖ = ‖x‖``)."""
        return self.kind == "rms" and self.uniform and self.bias is None and self.blocks == 1


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
        mean, factor = _mean_of_last_dim(mean)
        if mean is None or not isinstance(eps, (int, float)):
            continue
        square = mean.args[0]
        y = square.args[0] if is_op(square, aten.pow, aten.mul, aten.square) else None
        squares_y = (is_op(square, aten.pow) and square.args[1] == 2) or is_op(square, aten.square) or (
            is_op(square, aten.mul) and square.args[1] is y)
        if not squares_y:
            continue
        # x·rsqrt(f·Σx² + eps) = (fd)^-½ · x·rsqrt(mean(x²) + eps/(fd)); a mean has fd = 1.
        if _same(y, x):
            centred = _centred(x)
            if centred is not None and factor is None:
                # (x - mean(x)) * rsqrt(mean((x - mean(x))²) + eps): a LayerNorm written out.
                return centred[0], float(eps), centred[1] | {y}, "layer", None
            if centred is None:
                return x, _scaled_eps(eps, factor, x), frozenset({square, node}), "rms", _gain(factor, x)
        if isinstance(y, fx.Node) and strip_casts(y) is strip_casts(x) and is_op(y, *CASTS):
            reader = y  # the cast on the squares' side that reads x itself
            while reader.args[0] is not x and is_op(reader.args[0], *CASTS):
                reader = reader.args[0]
            if reader.args[0] is x:
                return x, _scaled_eps(eps, factor, x), frozenset({reader, node}), "rms", _gain(factor, x)
    return None


def _mean_of_last_dim(node: Any) -> tuple[fx.Node | None, float | None]:
    """``mean(s, -1, keepdim=True)`` -> (that node, None); ``f · sum(s, -1, keepdim=True)`` (or ``sum / c``,
    or a bare sum: ``f = 1``) -> (the sum, f); else (None, None)."""
    factor = None
    if is_op(node, aten.mul, aten.div) and len(node.args) == 2:
        a, b = node.args
        if is_op(node, aten.mul) and isinstance(a, (int, float)):
            a, b = b, a
        if not isinstance(b, (int, float)) or isinstance(b, bool) or b == 0:
            return None, None
        node, factor = a, (float(b) if is_op(node, aten.mul) else 1.0 / float(b))
    if not is_op(node, aten.mean, aten.sum) or len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)):
        return None, None
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    nd = val(node.args[0]).dim() if val(node.args[0]) is not None else 0
    if list(node.args[1]) not in ([-1], [nd - 1]) or not keepdim:
        return None, None
    if is_op(node, aten.sum):
        return node, 1.0 if factor is None else factor
    return (node, None) if factor is None else (None, None)


def _scaled_eps(eps: float, factor: float | None, x: fx.Node) -> float:
    return float(eps) if factor is None else float(eps) / (factor * last_dim(x))


def _gain(factor: float | None, x: fx.Node) -> float | None:
    """The ``(fd)^-½`` a sum-form norm multiplies its RMS-normalised input by (None for a mean)."""
    if factor is None or factor * last_dim(x) == 1:
        return None
    return (factor * last_dim(x)) ** -0.5


def rms_normalised(node: fx.Node) -> fx.Node | None:
    """The value ``node`` normalises when it is an RMS norm written out (``x * rsqrt(mean(x²) + eps)`` and
    the like, without ``γ``), else None."""
    core = _rms_core(node)
    return core[0] if core is not None and core[3] == "rms" and core[4] is None else None


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
        x, eps, readers, kind, gain = core
        return x, [last_dim(x)], kind, eps, gain, None, readers, node.meta.get(FUSED_NORM)
    return None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_number(value) -> bool:
    """A Python number or a one-element tensor: the same factor for every feature."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expression(value: Any) -> str:
    """How a constant is computed, as text: the parameters and buffers it reads (by target), the ops and
    the literals. Two norms whose γ and β have the same expression apply the same γ and β whatever the
    weights hold, so a decision made on it comes out the same when a saved model is rebuilt with
    uninitialised weights (``fxslice.load``); one made on the values would not."""
    if not isinstance(value, fx.Node):
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(expression(v) for v in value) + "]"
        return repr(value)
    if value.op == "get_attr":
        return str(value.target)
    arguments = [expression(a) for a in value.args] + [f"{k}={expression(v)}" for k, v in value.kwargs.items()]
    return f"{value.target}({', '.join(arguments)})"


def _extend(core_out: fx.Node, width: int, weight, bias, uniform: bool):
    """Follow casts, one γ multiply and one β add after the normalisation itself; ``uniform`` stays True
    while every γ is one number. Also returns the expressions of the factors and terms taken."""
    out = core_out
    taken = []
    while (user := _single_user(out)) is not None:
        if is_op(user, *CASTS) and user.args[0] is out:
            out = user
            continue
        if is_op(user, aten.mul, aten.add) and len(user.args) == 2:
            other = user.args[1] if user.args[0] is out else user.args[0]
            constant = constant_value(other) if other is not out else None
            vector = _vector(constant, width) if other is not out else None
            if vector is None:
                break
            taken.append(f"{user.target}({expression(other)})")
            if is_op(user, aten.mul):
                weight = vector if weight is None else weight * vector
                bias = None if bias is None else bias * vector
                uniform = uniform and _is_number(constant)
            else:
                bias = vector if bias is None else bias + vector
            out = user
            continue
        break
    return out, weight, bias, uniform, taken


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
        uniform = True
        if weight_node is not None:
            constant = constant_value(weight_node)
            weight, uniform = _vector(constant, width), _is_number(constant)
            if weight is None:
                continue
        if bias_node is not None:
            bias = _vector(constant_value(bias_node), width)
            if bias is None:
                continue
        out, weight, bias, uniform, taken = _extend(node, width, weight, bias, uniform)
        affine = " ".join([expression(weight_node), expression(bias_node)] + taken)
        # The op that multiplies x by its per-token factor: a written-out form's mul or div, or a single
        # rms_norm op of the model's own (fxslice's weightless readers are not in a stream).
        single = is_op(node, aten.rms_norm) and fused is None
        scaling = node if is_op(node, aten.mul, aten.div) or single else None
        norms.append(Norm(x, out, kind, width, eps, weight, bias, readers, fused, uniform=uniform, scaling=scaling,
                          affine=affine))
    return norms
