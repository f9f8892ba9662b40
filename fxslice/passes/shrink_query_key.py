"""shrink_query_key: delete the same channels from every attention's queries and keys.

Head ``h`` scores ``Σ_j q_j k_j`` over its channels ``j`` against its key/value group's keys
(``fxslice.analysis.attention``): deleting channel ``j`` from the query projection's rows of every head
of a group and from the key projection's rows of that group deletes one term of each of those heads'
scores and leaves the others as they were. A rotary embedding rotates channel ``j`` with ``j + d_h/2``
(or, interleaved, with its neighbour): the channels it ties are kept or deleted together (a unit), and
the cos / sin tables are indexed by the kept channels of each head. A partial rotary embedding slices
the channels: every group keeps as many rotated pairs and as many passed-through channels, so that the
slices cut every head alike.

Which channels: the units with the largest bound on their term, ``‖q_j‖ ‖k_j‖`` over the calibration
tokens (``‖q_j‖² = w_jᵀ C w_j`` for the projection's row ``w_j`` and ``C = Σ xᵀx`` of the input the
projections share; a bias adds ``2 b w_jᵀ Σx + n b²``), summed over the heads of the group: the column /
row selection of MoDeGPT's query/key compression. Nothing is refitted: a rotation mixes the two channels
of a pair with a position-dependent angle, so no matrix but a selection of whole pairs commutes with it.

The softmax scale stays ``1/√d_h`` of the original width (written into the attention when it was implied).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.attention import QueryKeyPath, RotaryTable, find_query_key_paths, narrowed_slice
from ..analysis.ops import ParamAxis, ShapeLiteral
from ..distributed import from_rank0
from ..errors import UnsupportedGraphError, module_path
from ..graph import add_parameter, aten, get_tensor, graph_device, set_tensor
from ..plan import Plan
from ..rewrite import select_axis, write_width
from .base import Context, FxslicePass, kept_width, recorded

__all__ = ["ShrinkQueryKey", "shrink_query_key"]


@dataclass(frozen=True)
class ShrinkQueryKey(FxslicePass):
    """Delete the query and key channels (rotary pairs) whose terms of the attention scores are smallest."""

    ratio: float = 0.25
    multiple_of: int = 8
    strict: bool = False
    progress: bool = True
    name = "shrink_query_key"

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"shrink_query_key ratio must be a number in [0, 1): the fraction of each head's query "
                             f"and key channels to delete; got {self.ratio!r}")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive integer; got {self.multiple_of!r}")

    def needs_calibration(self) -> str | None:
        return "shrink_query_key chooses the query and key channels from activations"

    def run(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:
        start = time.perf_counter()
        paths, skipped = find_query_key_paths(gm)
        if self.strict and skipped:
            raise UnsupportedGraphError("shrink_query_key: " + " | ".join(str(s) for s in skipped))
        if context.replay is not None:
            channels_of = recorded(context, self.name, "channels", [p.name for p in paths], "query projections")
            kept = [channels_of[p.name] for p in paths]
            for path, channels in zip(paths, kept):
                if len(channels[0]) < path.width:
                    _narrow_graph(gm, path, _insert_gathers(gm, path), torch.tensor(channels))
        else:
            kept = self._calibrate(gm, paths, context)
        prefix = plan.module_prefix
        details = {"channels": [[p.name, p.width, k] for p, k in zip(paths, kept)],
                   "modules": [module_path(p.query.node, prefix) for p in paths],
                   "skipped": [f"{module_path(s.node, prefix)}: {s.reason}" for s in skipped]}
        return plan.with_pass(self.spec(), details={self.name: details},
                              timings={f"{self.name}_s": time.perf_counter() - start})

    def _keep(self, path: QueryKeyPath) -> int:
        return path.width if self.ratio == 0 else kept_width(1.0 - self.ratio, path.width, self.multiple_of)

    def _calibrate(self, gm: fx.GraphModule, paths: list[QueryKeyPath], context: Context) -> list[list[list[int]]]:
        from ..calibrate import sweep_inner

        every = [[list(range(p.width))] * p.groups for p in paths]
        narrowed = [i for i, p in enumerate(paths) if self._keep(p) < p.width]
        if not narrowed:
            return every
        # The sweep runs the graph it was given: the tables' gathers go in first, keeping every channel.
        gathers = {i: _insert_gathers(gm, paths[i]) for i in narrowed}

        def apply(index: int, statistics) -> None:
            i = narrowed[index]
            path = paths[i]
            channels = from_rank0(lambda: _choose(gm, path, statistics, self._keep(path)))
            _narrow_graph(gm, path, gathers[i], channels)
            every[i] = channels.tolist()

        inputs = [paths[i].query.input for i in narrowed]
        sweep_inner(gm, list(context.calibration), [(x, None, (x,)) for x in inputs], apply,
                    progress=self.progress, desc="fxslice: shrinking query/key heads", unit="attention")
        return every


def _energies(gm: fx.GraphModule, weight: str, axis: int, bias: str | None, statistics) -> torch.Tensor:
    """``Σ (x w_j + b_j)²`` over the calibration tokens for every output channel ``j``."""
    w = torch.movedim(get_tensor(gm, weight).detach(), axis, 0).to(torch.float64)
    h = statistics.h.to(w.device)
    energy = ((w @ h) * w).sum(1)
    if bias is not None:
        b = get_tensor(gm, bias).detach().to(torch.float64)
        energy = energy + 2 * b * (w @ statistics.sum.to(w.device)) + statistics.tokens * b * b
    return energy.clamp_min(0)


def _choose(gm: fx.GraphModule, path: QueryKeyPath, statistics, keep: int) -> torch.Tensor:
    """``[groups, k]``: the channels each group keeps, ascending: whole units, as many of each kind in
    every group (so that slices cut every head alike), about ``keep`` channels in all."""
    d = path.width
    q = _energies(gm, path.query.weight, path.query.out_axis, path.query.bias, statistics).reshape(path.heads, d)
    k = _energies(gm, path.key.weight, path.key.out_axis, path.key.bias, statistics).reshape(path.groups, d)
    kinds = sorted(set(path.kinds))
    counts = {kind: round(keep / d * path.kinds.count(kind)) for kind in kinds}
    chosen = []
    for g in range(path.groups):
        q_g = q[[h for h in range(path.heads) if path.group_of_head[h] == g]].sum(0)
        # Cauchy–Schwarz: |Σ_tokens Σ_{j in unit} q_j k_j| ≤ ‖q_unit‖ ‖k_unit‖ (a rotation keeps a pair's length)
        score = torch.stack([(q_g[list(u)].sum() * k[g, list(u)].sum()).sqrt() for u in path.units])
        kept = []
        for kind in kinds:
            mine = [i for i, other in enumerate(path.kinds) if other == kind]
            best = torch.topk(score[mine], counts[kind]).indices.tolist()
            kept += [c for i in best for c in path.units[mine[i]]]
        chosen.append(sorted(kept))
    return torch.tensor(chosen)


def _insert_gathers(gm: fx.GraphModule, path: QueryKeyPath) -> list[tuple[RotaryTable, str, ShapeLiteral]]:
    """Index each rotary table per head, every position kept for now: ``table[..., index]`` laid out
    ``[…, heads, …, positions]``. Returns (table, index buffer, the position count written into the gather)."""
    gathers = []
    graph = gm.graph
    for table in path.tables:
        node, operand = table.node, table.node.args[table.arg]
        width, heads = len(table.layout), len(table.group_along_heads)
        index = torch.arange(width, device=graph_device(gm)).repeat(heads)
        buffer = add_parameter(gm, f"{path.name}.table_index", index, before=node, buffer=True)
        with graph.inserting_before(node):
            chosen = graph.call_function(aten.index_select.default, (operand, -1, buffer))
            split = graph.call_function(aten.unflatten.int, (chosen, -1, [heads, width]))
            moved = graph.call_function(aten.movedim.int, (split, -2, table.heads_axis))
            per_head = graph.call_function(aten.squeeze.dim, (moved, table.heads_axis + 1))
        node.update_arg(table.arg, per_head)
        gathers.append((table, buffer.target, ShapeLiteral(split, 2, 1)))
    return gathers


def _one_for_all(values: list, what: str, node: fx.Node):
    if len(set(values)) != 1:
        raise UnsupportedGraphError(f"shrink_query_key: the kept channels give the key/value groups different "
                                    f"{what} at {node.format_node()}; please report this graph")
    return values[0]


def _narrow_graph(gm: fx.GraphModule, path: QueryKeyPath, gathers, channels: torch.Tensor) -> None:
    """Keep ``channels[g]`` of every query head of group ``g`` and of its keys: the projections' rows,
    the widths and slice bounds written into the graph, the tables' indices, the key caches; pin the
    softmax scale to the original width."""
    d, keep = path.width, channels.shape[1]
    kept = [set(row) for row in channels.tolist()]
    query_rows = torch.cat([h * d + channels[path.group_of_head[h]] for h in range(path.heads)])
    key_rows = torch.cat([g * d + channels[g] for g in range(path.groups)])
    for use, rows in ((path.query, query_rows), (path.key, key_rows)):
        select_axis(gm, ParamAxis(use.weight, use.out_axis), rows)
        if use.bias is not None:
            select_axis(gm, ParamAxis(use.bias, use.bias_axis), rows)
    for literal, layout in path.widths:
        write_width([literal], _one_for_all([sum(c in k for c in layout) for k in kept], "widths", literal.node))
    for node, layout in path.slices:
        start, end = _one_for_all([narrowed_slice(node, layout, k) for k in kept], "slices", node) or (None, None)
        if start is None:
            raise UnsupportedGraphError(f"shrink_query_key: no bounds of {node.format_node()} take the kept "
                                        f"channels; please report this graph")
        args = list(node.args) + [None] * (4 - len(node.args))
        args[2] = start
        if args[3] is not None and args[3] < len(layout):
            args[3] = end
        node.args = tuple(args)
    for table, target, literal in gathers:
        positions = [[p for p, c in enumerate(table.layout) if c in kept[g]] for g in table.group_along_heads]
        set_tensor(gm, target, torch.tensor([p for row in positions for p in row], device=get_tensor(gm, target).device))
        write_width([literal], _one_for_all([len(row) for row in positions], "table widths", table.node))
    for target in path.caches:
        cache = get_tensor(gm, target)
        set_tensor(gm, target, cache.new_zeros(*cache.shape[:-1], keep))
    if path.attention.kwargs.get("scale") is None:
        path.attention.kwargs = {**path.attention.kwargs, "scale": 1 / math.sqrt(d)}


def shrink_query_key(ratio: float = 0.25, *, multiple_of: int = 8) -> ShrinkQueryKey:
    """``shrink_query_key(0.25)``: the ``ShrinkQueryKey`` pass."""
    return ShrinkQueryKey(ratio=ratio, multiple_of=multiple_of)
