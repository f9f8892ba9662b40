"""Attention head widths, found by op pattern: value projection → heads → attention → output projection
(``find_value_paths``), and query / key projections → heads, rotary embedding → attention
(``find_query_key_paths``, below).

Attention computes, for each query head ``h``, ``A_h V_g`` with ``V_g`` the values of the key/value group
``g = g(h)`` the head reads (``d_h`` channels of the value projection's output) and ``A_h`` the attention
weights; the output projection then reads every head's ``d_h`` channels: ``o = Σ_h A_h V_g O_h``. ``A_h``
mixes tokens, never channels, so for any invertible ``M`` (``d_h × d_h``, one per group) the values
``V_g M`` read back through ``M⁻¹ O_h`` by every head of the group give the same ``o``. Keeping ``r``
columns of ``V_g M`` and the matching ``r`` rows of ``M⁻¹ O_h`` narrows the value heads to ``r``
(``fxslice.passes.shrink_values`` chooses ``M``).

A *value path* is a linear whose output reaches the value operand of ``scaled_dot_product_attention``
through views into heads, transposes, head repeats (grouped-query attention) and a cache write
(``index_copy_`` into a buffer, in the decoding graph) only, with the value channels last throughout,
and whose attention output reaches one linear through transposes and reshapes only, the heads merged
with the channels last. Anything else on the way (a norm or rotary embedding on the values, an eager
attention written as matmuls) makes the candidate a ``SkippedValues`` with the node and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..errors import describe_node, module_path
from ..graph import aten, is_op, val
from .ops import SAME_VALUES, ParamAxis, ShapeLiteral, WeightUse, weight_use

__all__ = ["QueryKeyPath", "RotaryTable", "SkippedValues", "ValuePath", "find_query_key_paths", "find_value_paths",
           "value_module"]


@dataclass(frozen=True, eq=False)
class ValuePath:
    """``value`` makes the values of ``groups`` key/value groups of ``width`` channels each; ``output``
    reads the attention output of ``heads`` query heads, head ``h`` reading group ``group_of_head[h]``.

    ``literals``: the value width written into views and expands on the way; ``merged``: the heads ×
    width written into the reshape before ``output``; ``caches``: buffers that hold values (a decoding
    graph's cache), whose last dim is the value width."""

    value: WeightUse
    output: WeightUse
    width: int
    groups: int
    heads: int
    group_of_head: tuple[int, ...]
    literals: tuple[ShapeLiteral, ...]
    merged: tuple[ShapeLiteral, ...]
    caches: tuple[str, ...]

    @property
    def name(self) -> str:
        """The value projection's weight: how plans and reports name the path (stable across captures)."""
        return self.value.weight

    def value_sides(self) -> tuple[ParamAxis, ...]:
        """The value projection's output rows (and bias), ``groups`` blocks of ``width``."""
        sides = (ParamAxis(self.value.weight, self.value.out_axis, self.groups),)
        if self.value.bias is not None:
            sides += (ParamAxis(self.value.bias, self.value.bias_axis, self.groups),)
        return sides

    def output_side(self) -> ParamAxis:
        """The output projection's input columns, ``heads`` blocks of ``width``."""
        return ParamAxis(self.output.weight, self.output.in_axis, self.heads)


@dataclass(frozen=True)
class SkippedValues:
    """A value projection whose head width cannot be changed, and why."""

    node: fx.Node
    reason: str

    def __str__(self) -> str:
        return f"{self.reason}: {describe_node(self.node)}"


class _NotAPath(Exception):
    def __init__(self, node: fx.Node, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


class _UnknownOp(_NotAPath):
    """The channels pass through an op none of the walk's rules follows."""


def _cache_buffer(node: fx.Node, what: str) -> str:
    """The buffer an ``index_copy_`` writes ``what`` into along another dim than the channels (a decoding
    graph's cache)."""
    buffer = node.args[0]
    if buffer.op != "get_attr" or node.args[1] in (-1, len(_shape(node)) - 1):
        raise _NotAPath(node, f"{what} written into something other than a cache buffer")
    return buffer.target


def value_module(path: ValuePath, prefix: str = "") -> str:
    return module_path(path.value.node, prefix)


def find_value_paths(gm: fx.GraphModule) -> tuple[list[ValuePath], list[SkippedValues]]:
    """Every value path of ``gm`` (graph order), and the value operands of attention that are not one."""
    return _each_attention(gm, _value_path, "value")


def _each_attention(gm: fx.GraphModule, build, role: str) -> tuple[list, list[SkippedValues]]:
    """``build(attention)`` for every attention of ``gm`` (graph order), and those it refused, with the
    reason; a projection (of ``role``) read by two attentions is refused too."""
    paths, skipped = [], []
    for attention in gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        try:
            paths.append(build(attention))
        except _NotAPath as why:
            skipped.append(SkippedValues(why.node, why.reason))
    names = [p.name for p in paths]
    for path in paths:
        if names.count(path.name) > 1:
            skipped.append(SkippedValues(getattr(path, role).node, f"a {role} projection read by two attentions"))
    return [p for p in paths if names.count(p.name) == 1], skipped


def _shape(node) -> tuple:
    v = val(node)
    return tuple(v.shape) if v is not None and hasattr(v, "shape") else ()


def _value_path(attention: fx.Node) -> ValuePath:
    # Walk back from the value operand to the projection, recording the way in graph order.
    chain, caches, node = [], [], attention.args[2]
    while True:
        use = weight_use(node) if isinstance(node, fx.Node) else None
        if use is not None:
            break
        if not isinstance(node, fx.Node) or node.op != "call_function":
            raise _NotAPath(attention, "the attention's values come from no linear through views and head repeats")
        if is_op(node, aten.index_copy_, aten.index_copy):
            caches.append(_cache_buffer(node, "values"))
            chain.append(node)
            node = node.args[3]
            continue
        chain.append(node)
        node = node.args[0]
    if use.kind != "linear" or len(_shape(use.node)) < 2:
        raise _NotAPath(use.node, "the values come from an op that is not a plain linear")
    chain.reverse()
    heads_shape = _shape(chain[0]) if chain else ()
    if not chain or not is_op(chain[0], aten.view, aten.reshape, aten._unsafe_view) or len(heads_shape) != len(_shape(use.node)) + 1:
        raise _NotAPath(use.node, "the value projection's output is not split into heads by a view")
    groups, width = heads_shape[-2], heads_shape[-1]
    if not isinstance(groups, int) or not isinstance(width, int) or groups * width != _shape(use.node)[-1]:
        raise _NotAPath(chain[0], "the heads' count or width is not static")
    for node in [use.node, *chain[:-1]]:
        if len(node.users) != 1:
            raise _NotAPath(node, "a value on the way to attention is read elsewhere too")
    # Axis tags: which value head (and repeat) each axis of the current tensor indexes.
    tags: list = ["batch"] * (len(heads_shape) - 2) + [("group",), "width"]
    literals = [_literal(chain[0], width)]
    for node in chain[1:]:
        tags = _follow(node, tags, width, literals)
    value_heads = tags[-3] if len(tags) >= 3 else None
    if value_heads is None or not isinstance(value_heads, tuple):
        raise _NotAPath(attention, "the attention's value heads are not the projection's groups")
    out_shape = _shape(attention)
    heads = out_shape[-3] if len(out_shape) >= 3 else None
    value_head_count = _shape(chain[-1])[-3]
    if not isinstance(heads, int) or heads % value_head_count:
        raise _NotAPath(attention, "the query heads are not a multiple of the value heads")
    per_value_head = heads // value_head_count  # enable_gqa: query head h reads value head h // per_value_head
    group_of_value_head = _groups_of(value_heads, groups, _repeat(tags, chain[-1], groups))
    group_of_head = tuple(group_of_value_head[h // per_value_head] for h in range(heads))
    output, after, merged = _output_of(attention, heads, width)
    return ValuePath(use, output, width, groups, heads, group_of_head, tuple(x for x in literals + after if x),
                     tuple(merged), tuple(caches))


def _groups_of(tag: tuple, groups: int, repeat: int) -> list[int]:
    """The group each index of an axis tagged ``tag`` reads: ``("group",)``, or a group axis merged with a
    repeat axis (``("group", "repeat")``: each group's copies side by side; ``("repeat", "group")``: tiled)."""
    if tag == ("group",):
        return list(range(groups))
    if tag == ("group", "repeat"):
        return [i // repeat for i in range(groups * repeat)]
    if tag == ("repeat", "group"):
        return [i % groups for i in range(groups * repeat)]
    raise ValueError(tag)


def _literal(node: fx.Node, width: int, arg: int = 1) -> ShapeLiteral | None:
    shape = node.args[arg] if len(node.args) > arg else None
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[-1], int) and shape[-1] == width:
        return ShapeLiteral(node, arg, len(shape) - 1)
    return None


def _follow(node: fx.Node, tags: list, width: int, literals: list) -> list:
    """The axis tags after ``node``, which must keep the value channels last and whole."""
    nd = len(tags)
    if is_op(node, *SAME_VALUES) or is_op(node, aten.index_copy_, aten.index_copy):
        return tags
    if is_op(node, aten.transpose):
        a, b = (d % nd for d in node.args[1:3])
        if nd - 1 in (a, b):
            raise _NotAPath(node, "the value channels are moved from the last dim")
        tags = list(tags)
        tags[a], tags[b] = tags[b], tags[a]
        return tags
    if is_op(node, aten.slice):
        d = (node.args[1] if len(node.args) > 1 else 0) % nd
        whole = _shape(node)[d] == _shape(node.args[0])[d]
        if d == nd - 1 or (isinstance(tags[d], tuple) and not whole):
            raise _NotAPath(node, "a slice of the value channels or heads")
        return tags
    if is_op(node, aten.repeat_interleave) and isinstance(node.args[1], int) and len(node.args) > 2:
        d = node.args[2] % nd
        if not isinstance(tags[d], tuple):
            raise _NotAPath(node, "the values are repeated along another dim than the heads")
        return tags[:d] + [tags[d] + ("repeat",)] + tags[d + 1:]  # each group's copies side by side
    if is_op(node, aten.unsqueeze):
        d = node.args[1] % (nd + 1)
        if d == nd:
            raise _NotAPath(node, "a dim added after the value channels")
        return tags[:d] + [("repeat",)] + tags[d:]
    if is_op(node, aten.expand):
        literals.append(_literal(node, width))
        if _shape(node)[-1] != width:
            raise _NotAPath(node, "the value channels are broadcast")
        return tags
    if is_op(node, aten.view, aten.reshape, aten._unsafe_view):
        before, after = _shape(node.args[0]), _shape(node)
        if not after or after[-1] != width:
            raise _NotAPath(node, "a reshape changes the value channels")
        literals.append(_literal(node, width))
        if len(after) == len(before):
            return tags
        if len(after) == len(before) - 1:
            for i in range(nd - 2):
                if isinstance(tags[i], tuple) and isinstance(tags[i + 1], tuple):
                    return tags[:i] + [tags[i] + tags[i + 1]] + tags[i + 2:]
        raise _NotAPath(node, "a reshape mixes the value heads with other dims")
    raise _UnknownOp(node, "the values pass through an op that is not a view, transpose or head repeat")


def _output_of(attention: fx.Node, heads: int, width: int
               ) -> tuple[WeightUse, list[ShapeLiteral], list[ShapeLiteral]]:
    """The linear reading the attention output with the heads merged before the channels (``[…, H, d_h]``
    flattened to ``H·d_h``); the value width and the merged width written into reshapes on the way."""
    node, widths, merged, nd = attention, [], [], len(_shape(attention))
    tags = ["other"] * (nd - 3) + ["heads", "other", "width"]
    while True:
        if len(node.users) != 1:
            raise _NotAPath(node, "the attention output is read by more than one op")
        (user,) = node.users
        use = weight_use(user)
        if use is not None:
            if use.kind != "linear" or use.input is not node or tags[-1] != ("heads", "width"):
                raise _NotAPath(user, "the attention output reaches a linear without its heads merged before the channels")
            return use, widths, merged
        if is_op(user, *SAME_VALUES):
            node = user
            continue
        if is_op(user, aten.transpose):
            a, b = (d % len(tags) for d in user.args[1:3])
            tags = list(tags)
            tags[a], tags[b] = tags[b], tags[a]
            node = user
            continue
        if is_op(user, aten.view, aten.reshape, aten._unsafe_view):
            before, after = _shape(node), _shape(user)
            if len(after) == len(before) and after[-1] == before[-1] == width and tags[-1] == "width":
                widths.append(_literal(user, width))
            elif len(after) == len(before) - 1 and tags[-2:] == ["heads", "width"] and after[-1] == heads * width:
                merged += [x for x in [_literal(user, heads * width)] if x]
                tags = tags[:-2] + [("heads", "width")]
            else:
                raise _NotAPath(user, "a reshape of the attention output that is not the heads merged")
            node = user
            continue
        raise _NotAPath(user, "the attention output passes through an op that is not a transpose or reshape")


# Query/key widths ------------------------------------------------------------------------------------
#
# Head h's scores are Σ_p q_p k_p over the positions p of the query and key operands of the attention:
# deleting a channel from both deletes one term. The walk from each projection to the attention tracks
# which projection channel every position of every value holds (its *layout*: slices take part of it,
# concatenations join, a stack of two halves flattened interleaves them), and an elementwise op combining
# two values of different layouts ties the channels at equal positions together: a rotary embedding
# ``x·cos + rotate(x)·sin`` ties channel j to the channel its rotation reads (j + d_h/2 for halves, j ± 1
# for interleaved pairs). Tied channels are kept or deleted together (a *unit*). Tables multiplied into
# the channels (cos, sin) are indexed by the kept positions of each head. Anything else touching the
# channels (a norm over a head's channels) makes the candidate skipped.


@dataclass(frozen=True, eq=False)
class RotaryTable:
    """``node.args[arg]`` is a table multiplied into (or added to) a value whose positions hold the
    channels ``layout``, broadcast along axis ``heads_axis``, whose index ``i`` belongs to key/value group
    ``group_along_heads[i]``."""

    node: fx.Node
    arg: int
    heads_axis: int
    layout: tuple[int, ...]
    group_along_heads: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class QueryKeyPath:
    """``query`` makes ``heads`` heads and ``key`` makes ``groups`` groups of ``width`` channels, compared by
    ``attention``: head ``h`` with group ``group_of_head[h]``. ``units``: channels kept or deleted together;
    ``kinds[u]``: units of one kind hold the same number of positions on each side of every slice, so
    every group keeping as many units of each kind keeps the slices' bounds equal for all heads.
    ``widths``: literals and the layout whose kept count they hold; ``slices``: last-dim slices with the
    layout they read; ``caches``: buffers that hold keys, their last dim the width."""

    attention: fx.Node
    query: WeightUse
    key: WeightUse
    width: int
    groups: int
    heads: int
    group_of_head: tuple[int, ...]
    units: tuple[tuple[int, ...], ...]
    kinds: tuple[int, ...]
    widths: tuple[tuple[ShapeLiteral, tuple[int, ...]], ...]
    slices: tuple[tuple[fx.Node, tuple[int, ...]], ...]
    tables: tuple[RotaryTable, ...]
    caches: tuple[str, ...]

    @property
    def name(self) -> str:
        """The query projection's weight: how plans and reports name the path."""
        return self.query.weight


@dataclass
class _Walk:
    """What the walk from one projection to the attention found."""

    use: WeightUse
    groups: int
    tags: list = field(default_factory=list)
    layout: tuple = ()
    ties: list = field(default_factory=list)  # pairs of layouts combined position by position
    widths: list = field(default_factory=list)
    slices: list = field(default_factory=list)
    tables: list = field(default_factory=list)  # (node, arg, heads axis, layout, tag, repeat)
    caches: list = field(default_factory=list)


def find_query_key_paths(gm: fx.GraphModule) -> tuple[list[QueryKeyPath], list[SkippedValues]]:
    """Every attention whose query and key channels can be deleted together (graph order), and those that
    cannot, with the node and the reason."""
    return _each_attention(gm, _query_key_path, "query")


def _query_key_path(attention: fx.Node) -> QueryKeyPath:
    query_operand, key_operand = attention.args[0], attention.args[1]
    width = _shape(query_operand)[-1] if _shape(query_operand) else None
    if not isinstance(width, int) or _shape(key_operand)[-1:] != (width,):
        raise _NotAPath(attention, "the queries and keys are not of one static width")
    query, key = _walk(query_operand, width, "query"), _walk(key_operand, width, "key")
    if _uncast(query.use.input) is not _uncast(key.use.input):
        raise _NotAPath(key.use.node, "the queries and keys are made from different inputs")
    heads, key_heads = _shape(query_operand)[-3], _shape(key_operand)[-3]
    if query.tags[-3] != ("group",) or query.groups != heads:
        raise _NotAPath(attention, "the attention's query heads are not the query projection's heads")
    if not isinstance(heads, int) or not isinstance(key_heads, int) or heads % key_heads:
        raise _NotAPath(attention, "the query heads are not a multiple of the key heads")
    try:
        group_of_key_head = _groups_of(key.tags[-3], key.groups, _repeat(key.tags, key_operand, key.groups))
        group_of_head = tuple(group_of_key_head[h // (heads // key_heads)] for h in range(heads))
        tables = tuple(RotaryTable(node, arg, axis, layout, tuple(
            group_of_head[i] if walk is query else i for i in _groups_of(tag, walk.groups, repeat)))
            for walk in (query, key) for node, arg, axis, layout, tag, repeat in walk.tables)
    except ValueError:
        raise _NotAPath(attention, "the heads are repeated in a way fxslice cannot map to their groups") from None
    units = _units(width, query.ties + key.ties + [(query.layout, key.layout)])
    slices = query.slices + key.slices
    kinds = _kinds(units, slices)
    path = QueryKeyPath(attention, query.use, key.use, width, key.groups, heads, group_of_head, units, kinds,
                        tuple(query.widths + key.widths), tuple(slices), tables, tuple(query.caches + key.caches))
    _check_slices(path)
    return path


def _units(width: int, ties: list) -> tuple[tuple[int, ...], ...]:
    """The channels tied together by combining layouts position by position (union–find)."""
    parent = list(range(width))

    def root(c):
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for a, b in ties:
        for x, y in zip(a, b):
            parent[root(x)] = root(y)
    units: dict = {}
    for c in range(width):
        units.setdefault(root(c), []).append(c)
    return tuple(tuple(u) for u in sorted(units.values()))


def _kinds(units, slices) -> tuple[int, ...]:
    """Units alike for every slice: as many channels in what it reads and in what it takes."""
    signatures = []
    for unit in units:
        members = set(unit)
        signature = []
        for node, layout in slices:
            start, end, step = _slice_bounds(node, len(layout))
            signature += [sum(c in members for c in layout), sum(c in members for c in layout[start:end:step])]
        signatures.append(tuple(signature))
    order = sorted(set(signatures))
    return tuple(order.index(s) for s in signatures)


def _slice_bounds(node: fx.Node, size: int) -> tuple[int, int, int]:
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2] or 0, args[3], args[4] or 1
    return start, size if end is None or end > size else end, step


def narrowed_slice(node: fx.Node, layout: tuple[int, ...], kept: set) -> tuple[int, int] | None:
    """The start and end of a last-dim slice of ``layout`` once only the channels ``kept`` remain, or
    None if no bounds take from the narrowed layout the kept channels the slice took before."""
    start, end, step = _slice_bounds(node, len(layout))
    taken = [c for c in layout[start:end:step] if c in kept]
    narrowed = [c for c in layout if c in kept]
    if not taken:
        return (0, 0)
    bounds = narrowed.index(taken[0]), narrowed.index(taken[-1]) + 1
    return bounds if narrowed[bounds[0]:bounds[1]:step] == taken else None


def _check_slices(path: QueryKeyPath) -> None:
    """Every slice must cut every head alike once each group keeps as many units of each kind: tried
    with the first and the last half of every kind's units."""
    by_kind: dict = {}
    for unit, kind in zip(path.units, path.kinds):
        by_kind.setdefault(kind, []).append(unit)
    kept_sets = []
    for last in (False, True):
        kept: set = set()
        for units in by_kind.values():
            half = max(1, len(units) // 2)
            kept |= {c for unit in (units[len(units) - half:] if last else units[:half]) for c in unit}
        kept_sets.append(kept)
    for node, layout in path.slices:
        bounds = [narrowed_slice(node, layout, kept) for kept in kept_sets]
        if None in bounds or len(set(bounds)) != 1:
            raise _NotAPath(node, "a slice of the channels that deleting some of them would move")


def _uncast(node):
    while is_op(node, *SAME_VALUES) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _repeat(tags: list, node: fx.Node, groups: int) -> int:
    """How many copies of each of ``groups`` heads an axis tagged with a repeat holds in ``node``."""
    repeat = 1
    for tag, size in zip(tags, _shape(node)):
        if isinstance(tag, tuple) and "repeat" in tag:
            repeat = size // groups
    return repeat


_PLURAL = {"query": "queries", "key": "keys"}


def _region(operand: fx.Node, role: str) -> tuple[WeightUse, list[fx.Node]]:
    """The linear that makes ``operand`` and the nodes between them, in graph order."""
    seen, uses, stack = set(), [], [operand]
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        use = weight_use(node)
        if use is not None:
            uses.append(use)
        elif is_op(node, aten.index_copy_, aten.index_copy):
            stack.append(node.args[3])  # the values written; the cache buffer is not on the way
        else:
            stack.extend(node.all_input_nodes)
    if len(uses) != 1 or uses[0].kind != "linear":
        raise _NotAPath(operand, f"the attention's {_PLURAL[role]} are not made by one linear")
    (use,) = uses
    region = {use.node}
    for node in use.node.graph.nodes:
        if node in seen and any(a in region for a in node.all_input_nodes) and not (
                is_op(node, aten.index_copy_, aten.index_copy) and node.args[3] not in region):
            region.add(node)
    if operand not in region:
        raise _NotAPath(operand, f"the attention's {_PLURAL[role]} are not made by one linear")
    for node in region:
        readers = {u for u in node.users if is_op(u, aten.scaled_dot_product_attention)} if node is operand else region
        if any(u not in readers for u in node.users):
            raise _NotAPath(node, f"a {role} value on the way to attention is read elsewhere too")
    return use, [n for n in use.node.graph.nodes if n in region and n is not use.node]


def _walk(operand: fx.Node, width: int, role: str) -> _Walk:
    use, region = _region(operand, role)
    out = _shape(use.node)
    if len(out) < 2 or not isinstance(out[-1], int) or out[-1] % width:
        raise _NotAPath(use.node, f"the {role} projection's output is not whole heads")
    walk = _Walk(use, out[-1] // width)
    state = {use.node: (["batch"] * (len(out) - 1) + ["heads"], None)}
    for node in region:
        inputs = [a for a in node.all_input_nodes if a in state]
        tags, layout = state[inputs[0]]
        if tags[-1] == "heads":
            if is_op(node, *SAME_VALUES) or (is_op(node, aten.mul, aten.div) and not any(
                    isinstance(a, fx.Node) and a not in state and _shape(a)[-1:] not in ((), (1,)) for a in node.args)):
                state[node] = (tags, layout)  # a cast, a scale
                continue
            if not is_op(node, aten.view, aten.reshape, aten._unsafe_view):
                raise _NotAPath(node, f"the {role} projection's output passes through an op that deleting channels "
                                      f"would change before it is split into heads (a norm over it, say)")
            if _shape(node)[-2:] != (walk.groups, width):
                raise _NotAPath(node, f"the {role} projection's output is not split into heads of the attention's width")
            literal = _literal(node, width)
            walk.widths += [(literal, tuple(range(width)))] if literal else []
            state[node] = (["batch"] * (len(_shape(node)) - 2) + [("group",), "width"], tuple(range(width)))
            continue
        state[node] = _step(node, {a: state[a] for a in inputs}, role, walk)
    tags, layout = state[operand]
    if tags[-1] != "width" or len(tags) < 3 or not isinstance(tags[-3], tuple) or len(layout) != width:
        raise _NotAPath(operand, f"the attention's {_PLURAL[role]} are not the projection's heads with their "
                                 f"channels last")
    walk.tags, walk.layout = tags, layout
    return walk


_ELEMENTWISE = (aten.mul, aten.add, aten.sub, aten.div)


def _step(node: fx.Node, states: dict, role: str, walk: _Walk):
    """The axis tags and layout after ``node`` (``states``: those of its inputs on the way); records what
    narrowing must rewrite."""
    tags, layout = next(iter(states.values()))
    nd = len(tags)
    last = (lambda d: isinstance(d, int) and d % nd == nd - 1)
    if is_op(node, aten.cat, aten.stack):
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        whole = all(p in states and states[p][0] == tags for p in parts)
        if is_op(node, aten.cat) and last(dim) and whole:
            return tags, sum((states[p][1] for p in parts), ())
        if is_op(node, aten.stack) and dim % (nd + 1) == nd and whole and len(parts) == 2 and len(node.users) == 1:
            (flat,) = node.users  # a stack of two halves flattened: interleaved
            if is_op(flat, aten.flatten) and tuple(flat.args[1:]) in ((-2,), (-2, -1), (nd - 1,), (nd - 1, nd)):
                a, b = (states[p][1] for p in parts)
                return tags + ["stack"], tuple(c for pair in zip(a, b) for c in pair)
        raise _NotAPath(node, f"the {role} channels are joined with something fxslice cannot follow")
    if tags[-1] == "stack":
        if not is_op(node, aten.flatten):
            raise _NotAPath(node, f"stacked {role} channels are not flattened")
        return tags[:-1], layout
    if any(t != tags or len(other) != len(layout) for t, other in states.values()):
        raise _NotAPath(node, f"two {role} values of different shapes are combined")
    if is_op(node, aten.slice) and last(node.args[1] if len(node.args) > 1 else 0):
        start, end, step = _slice_bounds(node, len(layout))
        walk.slices.append((node, layout))
        return tags, layout[start:end:step]
    if is_op(node, aten.neg):
        return tags, layout
    if is_op(node, *_ELEMENTWISE):
        walk.ties += [(layout, other) for _, other in states.values() if other != layout]
        for arg, other in enumerate(node.args[:2]):
            if not isinstance(other, fx.Node) or other in states:
                continue
            shape = _shape(other)
            if len(shape) == 0 or shape[-1] == 1:
                continue
            heads_axis = next((i for i, t in enumerate(tags) if isinstance(t, tuple)), None)
            if (shape[-1] != len(layout) or len(shape) != nd or heads_axis is None or shape[heads_axis] != 1
                    or (is_op(node, aten.div) and arg == 1)):
                raise _NotAPath(node, f"the {role} channels are combined with a tensor fxslice cannot index per head")
            walk.tables.append((node, arg, heads_axis, layout, tags[heads_axis], _repeat(tags, node, walk.groups)))
        return tags, layout
    if is_op(node, aten.index_copy_, aten.index_copy):
        walk.caches.append(_cache_buffer(node, _PLURAL[role]))
        return tags, layout
    literals: list = []
    try:
        tags = _follow(node, tags, len(layout), literals)
    except _UnknownOp:
        raise _NotAPath(node, f"the {role} channels pass through an op that deleting channels would change "
                              f"(a norm over each head's channels, say)") from None
    walk.widths += [(x, layout) for x in literals if x]
    return tags, layout
