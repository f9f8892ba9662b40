"""MLP inner widths: linear(s) → pointwise ops → one linear, found by op pattern.

An *MLP* is a ``down`` linear whose input ``h`` (width ``m``, the inner width) is computed from the
outputs of one or more ``up`` linears by pointwise ops only: activation functions, the gating product
``act(x W_gate) · (x W_up)``, scaling, bias adds, casts. A pointwise op treats every inner channel on its
own, so keeping a subset ``S`` of the channels is exact up to ``h``: each up keeps its output rows ``S``
(and bias entries ``S``), every per-channel parameter met on the way keeps ``S``, and ``down`` reads
``h_S``; only ``down`` then changes, which a refit on calibration activations makes up for.

A fused projection whose output the graph splits into equal pieces along its last dim (``gate, up =
(x W).chunk(2, -1)``) is an up whose output rows form that many blocks, each indexed by the same inner
channels: keeping ``S`` keeps ``S`` in every block. Experts held as 3-D weights and applied by a grouped
matmul (rows grouped by expert offsets) are one MLP whose parameters have an expert axis first: every
expert keeps the same number of channels, each its own.

Anything else between the ups and ``down`` (a reshape into experts or heads, a reduction, an inner value
read outside the block, a weight shared with another op) makes the candidate a ``SkippedMLP`` with the
node and the reason.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import describe_node, module_path
from ..graph import aten, is_op, val
from .ops import ParamAxis, ShapeLiteral, StepKind, WeightUse, last_dim, stream_step, weight_use

__all__ = ["MLP", "SkippedMLP", "find_mlps", "mlp_module"]

@dataclass(frozen=True, eq=False)
class MLP:
    """``down`` reads ``inner`` (width ``width``), made from the outputs of ``ups`` by pointwise ops;
    ``channel_sides``: every parameter axis indexed by the inner channels except ``down``'s (the ups'
    outputs and biases, per-channel parameters met on the way; views on the way keep the channel axis last).

    ``groups``: for experts held as 3-D weights and applied by a grouped matmul, the node holding the
    offsets that split the rows (routed tokens) by expert; each expert keeps its own channels."""

    down: WeightUse
    ups: tuple[WeightUse, ...]
    channel_sides: tuple[ParamAxis, ...]
    literals: tuple[ShapeLiteral, ...]  # the inner width written into views and splits on the way
    inner: fx.Node
    width: int
    groups: fx.Node | None = None

    @property
    def name(self) -> str:
        """The down projection's weight: how plans and reports name the MLP (stable across captures)."""
        return self.down.weight


@dataclass(frozen=True)
class SkippedMLP:
    """A linear fed through pointwise ops by other linears, whose inner width cannot be changed."""

    name: str
    node: fx.Node
    reason: str

    def __str__(self) -> str:
        return f"{self.reason}: {describe_node(self.node)}"


def _is_pointwise(node: fx.Node) -> bool:
    """An elementwise ATen op (``torch.Tag.pointwise``); casts and views are the stream analysis's."""
    return node.op == "call_function" and torch.Tag.pointwise in getattr(node.target, "tags", ())


def _reads_shape(user: fx.Node, node: fx.Node) -> bool:
    step = stream_step(user, node)
    return step is not None and step.kind is StepKind.READS_SHAPE


def _broadcasts_over_channels(operand) -> bool:
    """A scalar, a 0-dim tensor or a tensor whose last dim is 1 (the same for every channel)."""
    if not isinstance(operand, fx.Node):
        return not isinstance(operand, (list, tuple))
    v = val(operand)
    return not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[-1] == 1


def _channel_parameter(operand, width: int) -> ParamAxis | None:
    """A parameter or buffer whose last axis is the inner channel axis (a per-channel scale or bias)."""
    if not isinstance(operand, fx.Node) or operand.op != "get_attr":
        return None
    v = val(operand)
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == width:
        return ParamAxis(operand.target, v.dim() - 1)
    return None


def _weight_dims(use: WeightUse) -> int:
    v = val(use.node.args[use.weight_arg])
    return v.dim() if isinstance(v, torch.Tensor) else 0


def _pieces(node: fx.Node, piece: int) -> tuple[int, tuple[ShapeLiteral, ...]] | None:
    """When ``node`` splits its input's last dim into equal pieces ``piece`` wide (``chunk``, ``split``,
    ``split_with_sizes``): how many, and the piece width written into its arguments."""
    if not is_op(node, aten.chunk, aten.split, aten.split_with_sizes) or not isinstance(node.args[0], fx.Node):
        return None
    whole, v = last_dim(node.args[0]), val(node.args[0])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if whole is None or whole % piece or dim not in (-1, v.dim() - 1):
        return None
    count, sizes = whole // piece, node.args[1]
    if is_op(node, aten.chunk):
        return (count, ()) if sizes == count else None
    if isinstance(sizes, int):
        return (count, (ShapeLiteral(node, 1, None),)) if sizes == piece else None
    if list(sizes) == [piece] * count:
        return count, tuple(ShapeLiteral(node, 1, i) for i in range(count))
    return None


def _walk(down: WeightUse, uses: dict[str, int], shapes: dict[str, tuple], order: dict[fx.Node, int]
          ) -> MLP | SkippedMLP | None:
    """Follow ``down``'s input back to the linears that produce it.

    None when this is no MLP: no up linear, or a value on the way is also read elsewhere (the output of
    a norm that several projections read, the residual stream).
    """
    h, width = down.input, last_dim(down.input)
    if h is None or width is None:
        return None
    ups: list[WeightUse] = []
    sides: list[ParamAxis] = []
    literals: list[ShapeLiteral] = []
    inner: set[fx.Node] = set()
    blocks = {h: 1}  # each value on the way is this many times the inner width: pieces of a fused projection
    problem: tuple[fx.Node, str] | None = None

    def reach(operand: fx.Node, count: int) -> None:
        nonlocal problem
        if blocks.setdefault(operand, count) != count:
            problem = problem or (operand, "the inner value is read both whole and split into pieces")
        queue.add(operand)

    # Latest node first: every user of a node inside the MLP is visited before the node itself.
    queue = {h}
    while queue:
        node = max(queue, key=order.__getitem__)
        queue.discard(node)
        if any(u not in inner and u is not down.node and not _reads_shape(u, node) for u in node.users):
            return None
        inner.add(node)
        count = blocks[node]
        use = weight_use(node)
        if use is not None and use.kind != "embedding" and node is not h:
            ups.append(use)
            sides += [ParamAxis(s.target, s.axis, count) for s in use.output_side()]
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and count == 1:
            reach(node.args[0], 1)  # one piece of a split: the split itself is next
            continue
        split = _pieces(node, width) if count == 1 else None
        if split is not None:
            literals += split[1]
            reach(node.args[0], split[0])
            continue
        if not _is_pointwise(node):
            operand = node.args[0] if node.args else None
            step = stream_step(node, operand) if isinstance(operand, fx.Node) else None
            if step is not None and step.kind is StepKind.COMMUTES and last_dim(operand) == width * count \
                    and (step.literal is None or count == 1):
                literals += [step.literal] if step.literal is not None else []
                reach(operand, count)  # a cast, or a view that keeps the channel axis
            else:
                problem = problem or (node, f"the inner value passes through {node.target}, not a pointwise op")
            continue
        for operand in (*node.args, *node.kwargs.values()):
            if isinstance(operand, fx.Node) and operand.op != "get_attr" and last_dim(operand) == width * count:
                reach(operand, count)
            elif (param := _channel_parameter(operand, width * count)) is not None:
                sides.append(ParamAxis(param.target, param.axis, count))
            elif not _broadcasts_over_channels(operand):
                problem = problem or (node, f"the inner value meets {operand}, which is neither per channel "
                                            "nor the same for every channel")
    if not ups:
        return None
    if problem is not None:
        return SkippedMLP(down.weight, *problem)
    groups = down.groups
    for use in (down, *ups):
        if _weight_dims(use) != (2 if groups is None else 3):
            reason = ("a weight has more than two axes and no expert offsets" if groups is None
                      else "the experts' weights are not all 3-D")
            return SkippedMLP(down.weight, use.node, reason)
        if use.groups is not groups:
            return SkippedMLP(down.weight, use.node, "its up and down projections group the tokens by "
                                                     "different expert offsets")
        shared = [w for w in (use.weight, use.bias) if w and uses.get(w, 0) > 1]
        if shared:
            return SkippedMLP(down.weight, use.node, f"the weight {shared[0]} is also read by another op")
    if groups is not None and (reason := _not_per_expert(down, sides, shapes)):
        return SkippedMLP(down.weight, down.node, reason)
    ups.sort(key=lambda u: order[u.node])
    return MLP(down, tuple(ups), tuple(dict.fromkeys(sides)), tuple(literals), h, width, groups)


def _not_per_expert(down: WeightUse, sides: list[ParamAxis], shapes: dict[str, tuple]) -> str | None:
    """Why the experts' channels could not be chosen per expert (each parameter's first axis an expert)."""
    experts = shapes[down.weight][0]
    for side in (down.input_side(), *sides):
        shape = shapes.get(side.target, ())
        if side.axis == 0 or not shape or shape[0] != experts:
            return f"the parameter {side.target} is not one slice per expert along its first axis"
    return None


def find_mlps(gm: fx.GraphModule) -> tuple[list[MLP], list[SkippedMLP]]:
    """The MLPs of ``gm`` in graph order, and the candidates that cannot be shrunk (with the reason)."""
    uses: dict[str, int] = {}
    shapes: dict[str, tuple] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + sum(1 for _ in node.users)
            shapes[node.target] = tuple(getattr(val(node), "shape", ()))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found, skipped = [], []
    for node in gm.graph.nodes:
        use = weight_use(node)
        if use is None or use.kind == "embedding" or use.input is None:
            continue
        result = _walk(use, uses, shapes, order)
        if isinstance(result, MLP):
            found.append(result)
        elif isinstance(result, SkippedMLP):
            skipped.append(result)
    return found, skipped


def mlp_module(mlp: MLP, prefix: str = "") -> str:
    """The module holding the MLP's down projection (``layers.3.mlp.down_proj``)."""
    return module_path(mlp.down.node, prefix)
