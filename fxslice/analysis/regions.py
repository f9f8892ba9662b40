"""Residual-stream regions: where a rotation of the feature dimension can be folded into weights.

A *region* is a connected set of graph values (``nodes``) that all carry the residual stream in their last
dimension. It is grown from the input of every normalisation: forwards through ops that commute with a
rotation of the last dim and through the adds that join streams, backwards to the ops that write the
stream. At its border sit

* *sources*, whose output side absorbs ``Q`` (``W ← WQ``): linears, embeddings, parameters added to the
  stream (positional embeddings) and norms written into the stream (post-norms);
* *sinks*, whose input side absorbs ``Qᵀ`` (``W ← QᵀW``): linears that read a norm's output, or the stream
  itself (the skip matrices fxslice inserts);
* *readers*: the norms of the stream. A norm without a per-feature ``γ`` or ``β`` whose output goes back
  into the stream (the stream renormalised in place, as in nGPT) is both a reader and a step the state
  runs through: ``norm(xQ) = norm(x)Q``.

A region is split into *states* (SliceGPT's per-residual rotations): a value read by more than one op
ends a state, and the edge from it into a later add is a *skip* edge, which needs the matrix
``Q_iᵀ Q_j`` once both states are rotated. Anything the stream meets that is none of these is a
``Blocker``: the region is not rotated, and the report says why.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch.fx as fx

from ..errors import describe_node, module_path
from ..graph import aten, is_op, val
from .norms import Norm, find_norms
from .ops import ParamAxis, ShapeLiteral, StepKind, WeightUse, last_dim, stream_step, weight_use, zeros_width

__all__ = [
    "SKIP_EDGE",
    "Blocker",
    "Region",
    "Sink",
    "Source",
    "State",
    "bind_parameters",
    "find_regions",
    "output_heads",
    "parameter_uses",
    "written_by",
]


SKIP_EDGE = "fxslice.skip_edge"
"""``node.meta`` key on the linears rotate inserts on skip edges (``Q_iᵀ Q_j``)."""


@dataclass(frozen=True)
class Blocker:
    node: fx.Node
    reason: str
    hint: str
    # (value, reader): a feature vector of the stream read by an op that does not commute with a rotation;
    # (value, None): a vector such an op writes into the stream. An inserted linear ``I`` on that edge (in
    # front of every reader for None) removes the blocker: a sink that gives the op back the unrotated
    # vector, ``(xQ)Qᵀ = x``, or a source that rotates what it writes, ``x I Q`` (see fuse_norm).
    bridge: tuple[fx.Node, fx.Node | None] | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {describe_node(self.node)}. What to do: {self.hint}"


@dataclass(frozen=True, eq=False)
class Source:
    """``node``'s output is written into the stream."""

    node: fx.Node
    use: WeightUse | None = None  # linear-like or embedding
    norm: Norm | None = None  # a norm written into the stream: fuse_norm gives it a linear to fold Q into
    coupled: bool = False  # not on the stream itself: its output feeds a parameter tied to this state

    def sides(self) -> tuple[ParamAxis, ...]:
        if self.use is not None:
            return self.use.output_side()
        if self.node.op == "get_attr":
            return (ParamAxis(self.node.target, val(self.node).dim() - 1),)
        return ()


@dataclass(frozen=True, eq=False)
class Sink:
    """``use`` reads the stream, directly (``norm`` is None) or through ``norm``; ``blocks`` copies of it
    side by side when the stream's last dim was merged with others on the way."""

    use: WeightUse
    norm: Norm | None
    blocks: int = 1

    def side(self) -> ParamAxis:
        """The weight axis the stream meets: ``blocks`` pieces, each rotated by the state's ``Q``."""
        return replace(self.use.input_side(), blocks=self.blocks)


@dataclass(frozen=True, eq=False)
class State:
    index: int
    anchor: fx.Node  # the first node holding the state's complete value
    nodes: frozenset
    width: int
    sources: tuple[Source, ...]
    sinks: tuple[Sink, ...]
    norms: tuple[Norm, ...]
    literals: tuple[ShapeLiteral, ...]

    def normed_values(self) -> list[fx.Node]:
        """The values this state's norms read, in graph order: what its covariance is taken of. A norm
        over merged copies (``blocks > 1``) is left out: it reads ``n`` copies side by side, not one."""
        order = {node: i for i, node in enumerate(self.anchor.graph.nodes)}
        return sorted({n.input for n in self.norms if n.blocks == 1}, key=order.__getitem__)

    def param_axes(self) -> tuple[tuple[ParamAxis, str], ...]:
        """Every parameter axis to transform with this state's Q, tagged 'out' (W ← WQ) or 'in'."""
        seen: dict[ParamAxis, str] = {}
        for source in self.sources:
            for side in source.sides():
                seen.setdefault(side, "out")
        for sink in self.sinks:
            seen.setdefault(sink.side(), "in")
        return tuple(seen.items())


@dataclass(frozen=True, eq=False)
class Region:
    index: int
    nodes: frozenset
    sources: tuple[Source, ...]
    sinks: tuple[Sink, ...]
    norms: tuple[Norm, ...]
    states: tuple[State, ...]
    skips: tuple[tuple[fx.Node, fx.Node], ...]  # (value of an earlier state, add of a later state)
    blockers: tuple[Blocker, ...]
    needs_centring: bool
    state_of: dict = field(repr=False)  # node -> State
    stream_norms: frozenset = frozenset()  # readers whose output stays in the stream (``Norm.commutes``)

    @property
    def width(self) -> int:
        return max(state.width for state in self.states)

    def reason(self) -> str | None:
        """Why this region cannot be rotated, or None when it can."""
        if not self.blockers:
            return None
        return "; ".join(str(b) for b in self.blockers)


_HINT_OP = (
    "fxslice rotates only through ops that commute with a rotation of the last dimension (casts, views "
    "that keep it, adds, scaling by a scalar); rewrite this op, or report it with its op name"
)


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


@dataclass
class _Growth:
    nodes: set = field(default_factory=set)
    sources: dict = field(default_factory=dict)
    direct_sinks: list = field(default_factory=list)
    readers: dict = field(default_factory=dict)  # norm -> copies of the stream side by side in its input
    literals: list = field(default_factory=list)
    blockers: list = field(default_factory=list)
    merged: dict = field(default_factory=dict)  # node holding merged copies of the stream -> the stream node
    tied: list = field(default_factory=list)  # stream values put side by side by one cat: one rotation for all
    stream_norms: set = field(default_factory=set)  # norms the stream runs through (``_in_stream``)


def _grow(seed: fx.Node, by_reader: dict, by_output: dict) -> _Growth:
    g = _Growth()
    queue = [seed]
    while queue:
        n = queue.pop()
        if n in g.nodes:
            continue
        g.nodes.add(n)
        _producer(n, g, queue, by_output, by_reader)
        for user in n.users:
            norm = by_reader.get(user)
            if norm is not None and norm.input is n:
                g.readers[norm] = 1
                if user is norm.scaling and _in_stream(norm, by_reader):
                    g.stream_norms.add(norm)
                    queue.append(user)  # x·r with r a number per token: the stream runs on through it
                continue
            use = weight_use(user)
            if use is not None and use.input is n:
                g.direct_sinks.append(Sink(use, None))
                if any((s := stream_step(j, user)) is not None and s.kind is StepKind.JOINS for j in user.users):
                    queue.append(user)  # a skip matrix: it reads one state and writes the next
                continue
            step = stream_step(user, n)
            if step is None:
                hint, bridge = _HINT_OP, (n, user)
                if user.op == "output":
                    hint = "return only the model's final outputs (e.g. output_hidden_states=False)"
                elif user.op == "call_function" and "dropout" in str(user.target):
                    # training mode is the thing to fix, not a linear to insert
                    hint = "call model.eval() before compiling (dropout in training mode does not commute)"
                    bridge = None
                g.blockers.append(Blocker(user, "the residual stream is read by an op fxslice cannot rotate through",
                                          hint, bridge))
                continue
            if step.kind is StepKind.READS_SHAPE:
                continue
            if step.kind is StepKind.MERGES:
                if user not in g.merged and is_op(user, aten.cat, aten.concatenate):
                    g.tied.append((user, tuple(user.args[0])))
                _merged_reads(user, n, step.blocks, g, by_reader)
                continue
            if step.literal is not None:
                g.literals.append(step.literal)
            queue.append(user)
    return g


def _merged_reads(start: fx.Node, origin: fx.Node, blocks: int, g: _Growth, by_reader: dict) -> None:
    """Follow ``blocks`` copies of the stream merged into one last dim (``start``, from the stream node
    ``origin``) through ops that keep that dim to the RMS norms and linears reading them."""
    frontier = [start]
    while frontier:
        m = frontier.pop()
        if m in g.merged:
            continue
        g.merged[m] = origin
        for user in m.users:
            norm = by_reader.get(user)
            if norm is not None and norm.input is m:
                if norm.kind == "rms":
                    g.readers[norm] = blocks
                else:
                    g.blockers.append(Blocker(user, "copies of the stream merged into one vector are centred by a "
                                              "LayerNorm", "only RMS norms can read merged copies of a stream"))
                continue
            use = weight_use(user)
            if use is not None and use.input is m:
                g.direct_sinks.append(Sink(use, None, blocks))
                continue
            step = stream_step(user, m)
            if step is not None and step.kind is StepKind.READS_SHAPE:
                continue
            if step is not None and step.kind is StepKind.COMMUTES and step.literal is None:
                frontier.append(user)
                continue
            g.blockers.append(Blocker(user, "copies of the stream merged into one vector are read by an op fxslice "
                                      "cannot rotate through", _HINT_OP))


def _producer(n: fx.Node, g: _Growth, queue: list, by_output: dict, by_reader: dict) -> None:
    if n in g.sources:
        return
    if n.op == "get_attr":
        g.sources[n] = Source(n)
        return
    norm = by_output.get(n)
    if norm is not None and norm.commutes and norm.scaling is not None:
        g.readers[norm] = 1  # written into the stream and commuting: the state runs back through it
        g.stream_norms.add(norm)
    elif norm is not None:
        g.sources[n] = Source(n, norm=norm)
        return
    zeros = zeros_width(n)
    if zeros is not None:  # a start of zeros: it reads nothing and rotates to itself; its width follows the state
        g.sources[n] = Source(n)
        g.literals.append(zeros)
        return
    use = weight_use(n)
    if use is not None:
        g.sources[n] = Source(n, use=use)
        if n.meta.get(SKIP_EDGE) and use.input is not None:
            queue.append(use.input)  # a skip matrix links the state it reads into this region
        return
    single = by_reader.get(n)
    if single is not None and single.scaling is n and single.commutes and is_op(n, aten.rms_norm):
        g.readers[single] = 1  # one rms_norm op: rms(xQ) = rms(x)Q, the state runs back to its input
        g.stream_norms.add(single)
        queue.append(single.input)
        return
    operands = []
    if n.op == "call_function":
        for operand in n.all_input_nodes:
            step = stream_step(n, operand)
            if step is not None and step.kind in (StepKind.COMMUTES, StepKind.JOINS):
                operands.append(operand)
    if not operands:
        what = "a model input" if n.op == "placeholder" else "an op fxslice cannot rotate through"
        hint = "pass token ids rather than embeddings" if n.op == "placeholder" else _HINT_OP
        g.blockers.append(Blocker(n, f"the residual stream is written by {what}", hint,
                                  (n, None) if n.op == "call_function" else None))
    queue.extend(operands)


def _in_stream(norm: Norm, by_reader: dict) -> bool:
    """``norm`` commutes with a rotation and its output, through ops that commute too, is added into a
    stream or read by another norm: the stream is renormalised in place rather than read."""
    if not norm.commutes or norm.scaling is None:
        return False
    frontier, seen = [norm.output], set()
    while frontier:
        m = frontier.pop()
        if m in seen:
            continue
        seen.add(m)
        for user in m.users:
            other = by_reader.get(user)
            if other is not None and other is not norm and other.input is m:
                return True
            step = stream_step(user, m) if weight_use(user) is None else None
            if step is not None and step.kind is StepKind.JOINS:
                return True
            if step is not None and step.kind is StepKind.COMMUTES and step.literal is None:
                frontier.append(user)
    return False


def _normed_values(norm: Norm, region_nodes: set, sinks: list, literals: list, blockers: list) -> None:
    """Follow a norm's output through commuting ops to the linears that read it."""
    frontier, seen = [norm.output], set()
    while frontier:
        m = frontier.pop()
        if m in seen:
            continue
        seen.add(m)
        for user in m.users:
            use = weight_use(user)
            if use is not None and use.input is m:
                sinks.append(Sink(use, norm, norm.blocks))
                continue
            step = stream_step(user, m)
            if step is not None and step.kind is StepKind.READS_SHAPE:
                continue
            if step is not None and step.kind is StepKind.COMMUTES and (step.literal is None or norm.blocks == 1):
                if step.literal is not None:
                    literals.append((norm, step.literal))
                frontier.append(user)
                continue
            if user in region_nodes:
                blockers.append(Blocker(user, "a norm's output is written back into the stream it normalises "
                                        "(post-LN)", "only pre-norm residual streams can be rotated"))
            elif step is not None and step.kind is StepKind.JOINS:
                blockers.append(Blocker(user, "post-norm stream: a norm's output is added into the residual stream "
                                        "(post-LN: the stream is renormalised after every block, which no "
                                        "rotation of it survives)", "only pre-norm residual streams can be rotated"))
            else:
                bridge = (m, user) if norm.blocks == 1 else None
                blockers.append(Blocker(user, "a norm's output is read by an op that is not a linear layer",
                                        _HINT_OP, bridge))


def _data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not ((s := stream_step(u, node)) is not None and s.kind is StepKind.READS_SHAPE)]


def _is_join(n: fx.Node, nodes: set) -> bool:
    return any(
        (s := stream_step(n, o)) is not None and s.kind is StepKind.JOINS for o in n.all_input_nodes if o in nodes
    )


def _states(nodes: set, sources: dict, shared: bool, order: dict, tied: list = ()):
    """Split a region into states: a value read by more than one op ends a state.

    Nodes linked by ops that commute (casts, views) hold the same value. An add that reads a value which
    is also read elsewhere (a norm, a skip matrix, another add) starts a new state: that edge is a skip.
    Values concatenated side by side (``tied``) are held to one state: the linears reading them take one
    ``Q`` in every block.
    """
    edges = []
    for n in nodes:
        if n in sources:
            continue
        for operand in n.all_input_nodes:
            step = stream_step(n, operand) if operand in nodes else None
            if step is not None and step.kind is not StepKind.READS_SHAPE:
                edges.append((operand, n, step.kind))
    values, states = _UnionFind(), _UnionFind()
    for n in nodes:
        values.find(n)
        states.find(n)
    for a, b, kind in edges:
        if kind is StepKind.COMMUTES:
            values.union(a, b)
            states.union(a, b)
    readers: dict = defaultdict(set)
    for n in nodes:
        root = values.find(n)
        for user in _data_users(n):
            if user not in nodes or values.find(user) is not root:
                readers[root].add(user)
    skips = []
    for a, b, kind in edges:
        if kind is StepKind.JOINS:
            if not shared and len(readers[values.find(a)]) > 1:
                skips.append((a, b))
            else:
                states.union(a, b)
    for pieces in tied:
        for piece in pieces[1:]:
            if piece in nodes and pieces[0] in nodes:
                states.union(piece, pieces[0])
    if shared:
        first = next(iter(nodes))
        for n in nodes:
            states.union(n, first)
    groups: dict = defaultdict(set)
    for n in nodes:
        groups[states.find(n)].add(n)
    return groups, states, sorted(skips, key=lambda e: (order[e[1]], order[e[0]]))


def find_regions(gm: fx.GraphModule, shared: bool = False) -> list[Region]:
    """All residual-stream regions of ``gm``, in graph order. ``shared``: one state per region."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    norms = find_norms(gm)
    by_reader = {r: norm for norm in norms for r in norm.readers}
    by_output = {norm.output: norm for norm in norms}
    claimed: set = set()
    regions: list[Region] = []
    for norm in norms:
        if norm.input in claimed:
            continue
        g = _grow(norm.input, by_reader, by_output)
        claimed |= g.nodes | set(g.merged)
        if not any(_is_join(n, g.nodes) for n in g.nodes):
            continue  # no residual add: a per-head norm or similar, not a residual stream
        blockers = list(g.blockers)
        sinks = list(g.direct_sinks)
        normed_literals: list = []
        readers = [replace(norm, blocks=blocks) if blocks > 1 else norm for norm, blocks in g.readers.items()]
        for reader in readers:
            if reader not in g.stream_norms:
                _normed_values(reader, g.nodes, sinks, normed_literals, blockers)
        for source in g.sources.values():
            if source.norm is not None and source.norm.input in g.nodes:
                blockers.append(Blocker(source.node, "a norm's output is written back into the stream it normalises "
                                        "(post-LN)", "only pre-norm residual streams can be rotated"))
        layer = [r for r in readers if r.kind == "layer" and r.fused is None]
        needs_centring = bool(layer)
        if layer and (len(layer) != len(readers) or g.direct_sinks):
            blockers.append(Blocker(layer[0].input, "the stream is read by LayerNorms and by other ops, so it "
                                    "cannot be centred", "use one kind of norm per residual stream"))
        for cat, pieces in g.tied:
            if any(p not in g.nodes for p in pieces):
                blockers.append(Blocker(cat, "the stream is put side by side with a value that is not the stream",
                                        "only values of the residual stream can be concatenated with it"))
        groups, uf, skips = _states(g.nodes, g.sources, shared, order, [pieces for _, pieces in g.tied])
        states = _build_states(groups, uf, g, sinks, readers, normed_literals, skips, order)
        if not shared and _shares_weights(states):
            # Layers that run more than once (looped or recurrent depth) read one weight from several
            # states, and one weight takes one Q; each pass would also need skip matrices of its own, so
            # the whole stream takes one rotation (Q_iᵀ Q_i = I: every skip is a plain add).
            groups, uf, skips = _states(g.nodes, g.sources, True, order)
            states = _build_states(groups, uf, g, sinks, readers, normed_literals, skips, order)
        state_of = {n: s for s in states for n in s.nodes}
        regions.append(Region(
            index=len(regions),
            nodes=frozenset(g.nodes),
            sources=tuple(sorted(g.sources.values(), key=lambda s: order[s.node])),
            sinks=tuple(sorted(sinks, key=lambda s: order[s.use.node])),
            norms=tuple(sorted(readers, key=lambda r: order[r.input])),
            states=states,
            skips=tuple(skips),
            blockers=tuple(blockers),
            needs_centring=needs_centring,
            state_of=state_of,
            stream_norms=frozenset(g.stream_norms),
        ))
    return regions


def _shares_weights(states: tuple[State, ...]) -> bool:
    """Whether two states rotate the same weight axis."""
    owner: dict = {}
    for state in states:
        for side, _ in state.param_axes():
            if owner.setdefault((side.target, side.axis), state) is not state:
                return True
    return False


def _build_states(groups, uf, g: _Growth, sinks, readers, normed_literals, skips, order) -> tuple[State, ...]:
    def stream(node: fx.Node) -> fx.Node:  # the stream node a reader's input comes from
        return g.merged.get(node, node)

    sink_state = defaultdict(list)
    for sink in sinks:
        key = uf.find(stream(sink.norm.input if sink.norm is not None else sink.use.input))
        sink_state[key].append(sink)
    norm_state = defaultdict(list)
    for reader in readers:
        norm_state[uf.find(stream(reader.input))].append(reader)
    literal_state = defaultdict(list)
    for literal in g.literals:
        literal_state[uf.find(literal.node)].append(literal)
    for norm, literal in normed_literals:
        literal_state[uf.find(stream(norm.input))].append(literal)
    skip_origins = {a for a, _ in skips}
    read = {stream(r.input) for r in readers} | {stream(s.use.input) for s in sinks if s.norm is None} | skip_origins
    drafts = []
    for root, members in groups.items():
        ordered = sorted(members, key=order.__getitem__)
        anchor = next((n for n in ordered if n in read), ordered[-1])
        drafts.append((order[anchor], root, anchor, members))
    states = []
    for index, (_, root, anchor, members) in enumerate(sorted(drafts, key=lambda d: d[0])):
        states.append(State(
            index=index,
            anchor=anchor,
            nodes=frozenset(members),
            width=last_dim(anchor),
            sources=tuple(sorted((g.sources[n] for n in members if n in g.sources), key=lambda s: order[s.node])),
            sinks=tuple(sink_state[root]),
            norms=tuple(norm_state[root]),
            literals=tuple(literal_state[root]),
        ))
    return tuple(states)


def parameter_uses(gm: fx.GraphModule) -> dict[str, list]:
    """For every get_attr target: the weight uses reading it, plus any other consumer node."""
    uses: dict[str, list] = defaultdict(list)
    for node in gm.graph.nodes:
        use = weight_use(node)
        if use is not None:
            uses[use.weight].append(use)
            if use.bias:
                uses[use.bias].append(use)
    return uses


def coupled_producer(start: fx.Node):
    """Walk back from an op's input through commuting single-use ops to the linear that produced it."""
    node, literals = start, []
    while isinstance(node, fx.Node) and len(_data_users(node)) == 1:
        use = weight_use(node)
        if use is not None and use.kind != "embedding":
            return use, literals
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        step = stream_step(node, node.args[0])
        if step is None or step.kind is not StepKind.COMMUTES:
            return None
        if step.literal is not None:
            literals.append(step.literal)
        node = node.args[0]
    return None


def bind_parameters(gm: fx.GraphModule, regions: list[Region]) -> list[Region]:
    """Check that every rotated weight axis belongs to one state, and follow tied weights.

    A weight axis bound to a state (say the embedding's columns, state 0) may also be the input side of
    an op outside every stream (the tied head reading fuse_norm's bridge). That op's input must then be
    in state 0's basis: the linear producing it becomes a *coupled source* of state 0. Anything else that
    shares a rotated weight is a conflict, reported as a blocker of the region.
    """
    uses = parameter_uses(gm)
    bound: dict[ParamAxis, State] = {}
    region_of: dict[State, Region] = {}
    owner: set = set()
    blockers: dict[int, list[Blocker]] = defaultdict(list)
    for region in regions:
        if region.reason():
            continue
        for state in region.states:
            region_of[state] = region
            owner |= {s.node for s in state.sources} | {s.use.node for s in state.sinks}
            for side, _ in state.param_axes():
                other = bound.setdefault(side, state)
                if other is not state:
                    blockers[region.index].append(Blocker(state.anchor, f"the weight axis {side.target}[{side.axis}] "
                                                          "belongs to two residual states",
                                                          "run fuse_norm first, which bridges or unties shared weights"))
    extra: dict[State, list] = defaultdict(list)
    for side, state in list(bound.items()):
        for use in uses.get(side.target, ()):
            if use.node in owner:
                continue
            found = coupled_producer(use.input) if use.in_axis == side.axis and use.weight == side.target else None
            if found is None:
                blockers[region_of[state].index].append(Blocker(
                    use.node, f"the weight {side.target} is rotated with a residual state but also read here",
                    "untie the weight (give this op its own copy) before compiling"))
                continue
            producer, literals = found
            owner.add(producer.node)
            extra[state].append((Source(producer.node, use=producer, coupled=True), literals))
    result = []
    for region in regions:
        states = tuple(
            replace(s, sources=s.sources + tuple(src for src, _ in extra[s]),
                    literals=s.literals + tuple(lit for _, lits in extra[s] for lit in lits)) if extra.get(s) else s
            for s in region.states
        )
        state_of = {n: s for s in states for n in s.nodes}
        result.append(replace(region, states=states, state_of=state_of,
                              blockers=region.blockers + tuple(blockers.get(region.index, ()))))
    return result


def output_heads(gm: fx.GraphModule) -> set[fx.Node]:
    """The weight uses whose output reaches the graph's output without passing another weight use."""
    heads: set = set()
    seen: set = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if weight_use(node) is not None:
            heads.add(node)
        else:
            stack.extend(node.all_input_nodes)
    return heads


def written_by(state: State, prefix: str = "") -> str:
    """The module that last writes ``state`` (``model.layers.3.mlp.down_proj``): how reports name it."""
    own = [s.node for s in state.sources if not s.coupled and not s.node.meta.get(SKIP_EDGE)]
    return module_path(own[-1] if own else state.anchor, prefix)
