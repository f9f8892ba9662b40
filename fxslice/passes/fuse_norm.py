"""fuse_norm: make every norm on a residual stream a weightless RMS norm, exactly.

* LayerNorm → RMSNorm: centring is the projection ``C = I − 11ᵀ/d``; folded into every source
  (``W_out ← W_out C``) it makes the stream zero-mean, and on a zero-mean stream LayerNorm is RMSNorm.
* ``γ`` and ``β`` move into the linears that read the norm: ``W_in ← diag(γ) W_in``, ``b ← b + βW_in``.
  Offset norms (``1 + w``) are the same fold, since ``γ`` is whatever constant multiplies the output.
* A linear whose weight is shared with another op (a head tied to the embedding), or whose op takes no
  bias for ``βW`` (experts held as one 3-D weight), keeps its weight: a
  small linear carrying ``diag(γ)`` and ``β`` is inserted in front of it (the *bridge*, which rotate later
  turns into ``Q_Lᵀ diag(γ) Q_0``). When the stream must be centred, the shared weight becomes ``EC``
  and a rank-1 correction restores the mean it lost (see ``FuseNorm._bridge``): the head stays tied.
* A tied head that reads a value off every stream (BERT-style: dense, gelu, a norm of its own) gets an
  inserted ``I`` in front (rotate turns it into ``Q_0``), and the same rank-1 correction where the
  embedding is centred (``FuseNorm._bridge_off_stream``).
* A norm written *into* the stream (a post-norm, or a norm on the embeddings) becomes weightless,
  followed by an inserted linear ``diag(γ)``, ``β``: a source like any other. This runs first, to a
  fixed point, because that linear is also what lets the stream the norm *reads* be fused: its output
  then goes only into a linear.
* A constant per-channel scale of the stream (``s ⊙ x``: a learned weight on the residual branch) becomes
  an inserted linear ``diag(s)``, in the same loop: it reads one state and writes into the next, as the
  skip matrix that edge would need anyway, and rotate folds ``Q_iᵀ diag(s) Q_j`` into it.
* An op that reads or writes a stream's vectors without commuting with a rotation (a norm gated by a
  sigmoid of itself, a convolution along the sequence) does so through an inserted ``I`` on that edge, in
  the same loop, where the stream's weights pay for it (``_bridges_pay``): rotate makes a reader's
  ``Qᵀ`` and a writer's ``Q``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..analysis.norms import Norm
from ..analysis.ops import WeightUse
from ..analysis.regions import Blocker, Region, coupled_producer, find_regions, parameter_uses
from ..errors import UnsupportedGraphError, module_path
from ..graph import (add_parameter, aten, constant_value, eliminate_dead_code, get_tensor, is_op, refresh_shapes,
                     set_tensor, tensor_meta, val)
from ..rewrite import emit_norm, insert_linear, multiply_axis, scale_axis
from ..plan import Plan, Skipped, plan_of
from .base import Context, FxslicePass, skipped_regions

__all__ = ["FuseNorm", "fuse_norm"]


def _centring(width: int) -> torch.Tensor:
    return torch.eye(width, dtype=torch.float64) - torch.full((width, width), 1.0 / width, dtype=torch.float64)


def _uses_by_tensor(gm: fx.GraphModule) -> dict[str, list[WeightUse]]:
    """Weight uses per target, merging targets that name the same tensor (weights tied by aliasing)."""
    uses = parameter_uses(gm)
    groups: dict[int, list[WeightUse]] = defaultdict(list)
    for target, target_uses in uses.items():
        groups[id(tensor_meta(gm, target))].extend(target_uses)
    return {target: groups[id(tensor_meta(gm, target))] for target in uses}


def _add_bias(gm: fx.GraphModule, use: WeightUse, shift: torch.Tensor) -> None:
    """``b ← b + shift`` on the output side of ``use``, creating the bias if it has none."""
    if use.bias is not None:
        bias = get_tensor(gm, use.bias)
        set_tensor(gm, use.bias, (bias.detach().to(torch.float64) + shift).to(bias.dtype))
        return
    dtype = tensor_meta(gm, use.weight).dtype
    node = add_parameter(gm, f"bias_{_where(use.node)}", shift.to(dtype), before=use.node)
    if use.kind == "linear":
        use.node.args = (use.node.args[0], use.node.args[1], node)
        return
    with gm.graph.inserting_after(use.node):
        added = gm.graph.call_function(aten.add.Tensor, (use.node, node))
    use.node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)


def _fold(gm: fx.GraphModule, use: WeightUse, gamma: torch.Tensor | None, beta: torch.Tensor | None) -> None:
    side = use.input_side()
    if beta is not None:
        weight = get_tensor(gm, use.weight).detach().to(torch.float64)
        if weight.dim() != 2:
            raise UnsupportedGraphError(f"cannot fold a norm's bias into the {weight.dim()}-D weight of "
                                        f"{use.node.format_node()}")
        # (x + β)W = xW + βW: contract β with the weight's input axis.
        _add_bias(gm, use, torch.movedim(weight, side.axis, -1) @ beta.to(weight))  # β may be a CPU constant
    if gamma is not None:
        scale_axis(gm, side, gamma)  # (x·diag(γ))W = x(diag(γ)W)


@dataclass(frozen=True)
class FuseNorm(FxslicePass):
    """Fold every residual-stream norm's affine parameters into its neighbours (exact)."""

    strict: bool = False
    name = "fuse_norm"

    def run(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:
        post_norms, scales, opaque_ops = self._linears_on_the_stream(gm)
        regions = find_regions(gm)
        if _untie_constant_states(gm, regions):
            regions = find_regions(gm)
        skipped = skipped_regions(regions, self.strict, "fuse_norm")
        uses = _uses_by_tensor(gm)
        record: dict[str, Any] = {"regions": [], "post_norms": post_norms}
        if scales:
            record["channel_scales"] = scales
        if opaque_ops:
            record["bridged_ops"] = [where for where, _ in opaque_ops]
            places = list(dict.fromkeys(f"{op} in module '{where}'" for where, op in opaque_ops))
            listed = "; ".join(places[:4]) + ("; …" if len(places) > 4 else "")
            warnings.warn(f"fuse_norm: ops that do not commute with a rotation read or write the residual stream "
                          f"through {len(opaque_ops)} inserted linears (d × d each, counted in the parameters): "
                          f"{listed}. Where such an op does commute (it acts on each token's feature vector as a "
                          "whole), fxslice.analysis.register_stream_op saves its linears", stacklevel=3)
        fusable = [r for r in regions if not r.reason()]
        bridged = {s.use.node for r in fusable for s in r.sinks if s.norm is not None}
        streams = {s.node for r in regions for s in r.sources} | {s.use.node for r in regions for s in r.sinks}
        conflicts = {r.index: _centring_conflict(r, uses, bridged, streams) for r in fusable}
        fused = [r for r in fusable if not conflicts[r.index]]
        skipped += tuple(Skipped("fuse_norm", r.index, r.width, conflicts[r.index])
                         for r in fusable if conflicts[r.index])
        # Every weight axis that centring changes; a shared weight read through a bridge needs the
        # rank-1 correction when *any* stream centres it (an embedding tied to the head of a later stream).
        centred_sides = {side for r in fused if r.needs_centring for source in r.sources for side in source.sides()}
        for region in fusable:
            entry = {"region": region.index, "centred": region.needs_centring and region in fused,
                     "norms": len(region.norms), "bridges": []}
            if conflicts[region.index]:
                entry["skipped"] = conflicts[region.index]
            else:
                entry["bridges"] = [_where(node) for node in self._fold_norms(gm, region, uses, centred_sides)]
            record["regions"].append(entry)
        self._bridge_off_stream(gm, streams, fused, uses, centred_sides)
        # Centring last: the bridges above read the shared weights before ``C`` changes them.
        for region in fused:
            if region.needs_centring:
                centring = _centring(region.width)
                for side in {side for source in region.sources for side in source.sides()}:
                    multiply_axis(gm, side, centring)  # W_out ← W_out C: every write to the stream is zero-mean
        return plan.with_pass(self.spec(), skipped=plan.skipped + skipped, details={"fuse_norm": record})

    def _fold_norms(self, gm: fx.GraphModule, region: Region, uses: dict, centred_sides: set) -> list[fx.Node]:
        """Fold each norm's γ, β into the linears reading it (or bridge a shared one); return the bridged."""
        bridged = []
        norm_of = {s.use.node: s.norm for s in region.sinks if s.norm is not None}
        # A stream norm's old nodes, from its scaling through casts and γ to its output, taken before any
        # norm is emitted: emitted norms read through casts (``strip_casts``) and add users to them.
        paths = {norm: _chain(norm.scaling, norm.output) for norm in region.stream_norms}
        folded = set()
        # Last first: every norm that reads a stream norm is emitted before the stream norm replaces its nodes.
        for norm in reversed(region.norms):
            if norm in region.stream_norms:  # γ is one number and stays with it: it has no sinks to fold into
                out = emit_norm(gm, norm, "rms", in_stream=True)
                path = paths[norm]
                for node in path:  # its readers, original or emitted above, read the weightless form
                    for user in list(node.users):
                        if user not in path:
                            user.replace_input_with(node, out)
                continue
            for use in (s.use for s in region.sinks if s.norm is norm):
                # A weight read only through norms with this γ and β, on the same axis, takes them once:
                # one expert's matrix of a 3-D weight each, or a layer that runs more than once.
                alike = [u for u in uses.get(use.weight, ()) if u.in_axis is not None
                         and u.input_side() == use.input_side() and _same_affine(norm_of.get(u.node), norm)]
                shared = len(alike) < len(uses.get(use.weight, ()))
                # (x + β)W = xW + βW needs one bias that every such op adds, which a 3-D weight's op
                # does not take.
                no_bias = norm.bias is not None and (tensor_meta(gm, use.weight).dim() != 2 or (
                    len(alike) > 1 and (use.bias is None or len({u.bias for u in alike}) > 1)))
                if shared or no_bias:
                    self._bridge(gm, norm, use, use.input_side() in centred_sides)
                    bridged.append(use.node)
                elif use.input_side() not in folded:
                    _fold(gm, use, norm.weight, norm.bias)
                    folded.add(use.input_side())
            out = emit_norm(gm, norm, "rms")
            norm.output.replace_all_uses_with(out)
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        return sorted(bridged, key=order.__getitem__)

    @staticmethod
    def _bridge_off_stream(gm: fx.GraphModule, streams: set, fused: list[Region], uses: dict,
                           centred_sides: set) -> None:
        """A stream source's weight (a tied embedding) read by a linear off every stream (the head behind
        a norm of its own): that linear's input must take the stream's rotation (``xQ (EQ)ᵀ = xEᵀ``), so
        it needs a linear producer for rotate to couple, an inserted ``I`` where it has none; where the
        stream is centred, it also gets back the mean ``EC`` loses (``_restore_mean``). ``streams``: the
        nodes that read or write a stream."""
        sides = {side for r in fused for source in r.sources for side in source.sides()}
        for side in sides:
            for use in uses.get(side.target, ()):
                if use.node in streams or use.in_axis is None or use.input_side() != side:
                    continue
                x = use.input
                width = val(x).shape[-1]
                if side in centred_sides:
                    _restore_mean(gm, use, x, torch.ones(width, dtype=torch.float64), None)
                if coupled_producer(x) is None:
                    identity = torch.eye(width, dtype=tensor_meta(gm, use.weight).dtype)
                    bridge = insert_linear(gm, x, identity, None, f"bridge_{_where(use.node)}", use.node)
                    use.node.replace_input_with(x, bridge)

    @staticmethod
    def _bridge(gm: fx.GraphModule, norm: Norm, use: WeightUse, centred: bool) -> None:
        """Keep a shared weight ``E`` (a tied head) and put the norm's ``γ``, ``β`` in front of it.

        Without centring: ``(n∘γ + β) Eᵀ = bridge(n) Eᵀ`` with ``bridge = diag(γ)``, bias ``β``. With
        centring the shared weight becomes ``EC``; since ``C + 11ᵀ/d = I``,
        ``(n∘γ + β) Eᵀ = (n∘γ)(EC)ᵀ + (n·γ/d)(E1)ᵀ + βEᵀ``: the bridge carries ``diag(γ)`` and a rank-1
        correction (``d + 2V`` parameters instead of untying ``V × d``) adds the rest.
        """
        width = norm.width
        gamma = norm.weight if norm.weight is not None else torch.ones(width, dtype=torch.float64)
        dtype = tensor_meta(gm, use.weight).dtype
        bias = norm.bias.to(dtype) if norm.bias is not None and not centred else None
        normed = use.input
        bridge = insert_linear(gm, normed, torch.diag(gamma).to(dtype), bias, f"bridge_{_where(use.node)}", use.node)
        use.node.replace_input_with(normed, bridge)
        if centred:
            _restore_mean(gm, use, normed, gamma, norm.bias)

    def _linears_on_the_stream(self, gm: fx.GraphModule) -> tuple[list[str], list[str], list[tuple[str, str]]]:
        """Give every norm written into a transformable stream, every per-channel scale of a stream and
        every op that reads a stream's vector without commuting with a rotation its linear; repeat until
        none is left. Returns where each went (post-norms, scales, and bridged ops with their op names)."""
        post_norms: list[str] = []
        scales: list[str] = []
        bridged: list[tuple[str, str]] = []
        while True:
            regions = find_regions(gm)
            pending = [s.norm for r in regions if not r.reason() for s in r.sources if s.norm is not None]
            scaled, bridges = {}, {}
            for region in regions:
                matches = [(_channel_scale(b.node), _bridge_edge(b, region)) for b in region.blockers]
                # only where nothing else stops the stream: d × d is worth it if the stream then rotates
                if not all(scale or bridge for scale, bridge in matches):
                    continue
                opaque = [bridge for scale, bridge in matches if bridge and not scale]
                if opaque and not _bridges_pay(gm, region, len(opaque)):
                    continue
                scaled.update((scale[0], scale) for scale, _ in matches if scale)
                bridges.update((bridge, bridge) for bridge in opaque)
            if not pending and not scaled and not bridges:
                return post_norms, scales, bridged
            for norm in pending:
                post_norms.append(_where(norm.output))
                self._post_norm(gm, norm)
            for node, stream, scale in scaled.values():
                scales.append(_where(node))
                # s ⊙ x = x diag(s), a linear like any other on the stream
                linear = insert_linear(gm, stream, torch.diag(scale).to(val(node).dtype), None,
                                       f"channel_scale_{_where(node)}", node)
                node.replace_all_uses_with(linear)
            for value, reader in bridges.values():
                # x I = x now; rotate makes a reader's (xQ)Qᵀ = x, so the op reads the vector it always read,
                # and a writer's x I Q, so the op writes the vector it always wrote
                identity = torch.eye(val(value).shape[-1], dtype=val(value).dtype)
                if reader is None:
                    bridged.append((_where(value), str(value.target)))
                    linear = insert_linear(gm, value, identity, None, f"writer_bridge_{_where(value)}", value.next)
                    value.replace_all_uses_with(linear, delete_user_cb=lambda user: user is not linear)
                else:
                    bridged.append((_where(reader if reader.op != "output" else value), str(reader.target)))
                    linear = insert_linear(gm, value, identity, None, f"reader_bridge_{_where(value)}", reader)
                    reader.replace_input_with(value, linear)
            eliminate_dead_code(gm)
            gm.recompile()
            refresh_shapes(gm)  # the analysis reads every node's shape and dtype

    @staticmethod
    def _post_norm(gm: fx.GraphModule, norm: Norm) -> None:
        width = norm.width
        out = emit_norm(gm, norm, norm.kind, reader=False)
        gamma = norm.weight if norm.weight is not None else torch.ones(width, dtype=torch.float64)
        dtype = val(norm.output).dtype
        bias = norm.bias.to(dtype) if norm.bias is not None else None
        linear = insert_linear(gm, out, torch.diag(gamma).to(dtype), bias, f"post_norm_{_where(norm.output)}", norm.output)
        norm.output.replace_all_uses_with(linear)


def _restore_mean(gm: fx.GraphModule, use: WeightUse, x: fx.Node, gamma: torch.Tensor,
                  beta: torch.Tensor | None) -> None:
    """``use`` reads ``(x∘γ + β)`` through a shared weight ``E`` that centring turns into ``EC``; since
    ``C + 11ᵀ/d = I``, ``(x∘γ + β)Eᵀ = (x∘γ)(EC)ᵀ + (x·γ/d)(E1)ᵀ + βEᵀ``: add the rank-1 rest (``d + 2V``
    parameters instead of untying ``V × d``). Reads ``E`` before it is centred."""
    dtype = tensor_meta(gm, use.weight).dtype
    shared = torch.movedim(get_tensor(gm, use.weight).detach().to(torch.float64), use.in_axis, -1)  # [V, d]
    offset = shared @ beta.to(shared) if beta is not None else None
    scale = insert_linear(gm, x, (gamma / gamma.numel()).unsqueeze(0).to(dtype), None,
                          f"mean_{_where(use.node)}", use.node)  # x ↦ x·γ/d
    correction = insert_linear(gm, scale, shared.sum(-1, keepdim=True).to(dtype),
                               None if offset is None else offset.to(dtype), f"rank1_{_where(use.node)}", use.node)
    with gm.graph.inserting_after(use.node):
        total = gm.graph.call_function(aten.add.Tensor, (use.node, correction))
    use.node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)


def _untie_constant_states(gm: fx.GraphModule, regions) -> int:
    """A parameter vector added into the stream at several places (one bias that every layer adds) joins
    several states, so the analysis makes it a state of its own, joined to each by a skip matrix, with no
    activations to calibrate a rotation on. Each place after the first gets a copy instead (``d`` more
    parameters each, where a skip matrix costs ``d × k``), a source of the state it joins. Returns the copies."""
    copies = 0
    for state in (s for r in regions for s in r.states):
        if not all(node.op == "get_attr" for node in state.nodes):
            continue
        for node in state.nodes:
            tensor = get_tensor(gm, node.target).detach()
            for user in list(node.users)[1:]:
                copy = add_parameter(gm, f"{node.target}_copy", tensor.clone(), before=user)
                user.replace_input_with(node, copy)
                copies += 1
    return copies


def _chain(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    """The nodes from ``start`` to ``end`` along single users (a norm's casts and ``γ`` multiply)."""
    chain, node = {start}, start
    while node is not end:
        (node,) = node.users
        chain.add(node)
    return chain


def _same_affine(a: Norm | None, b: Norm) -> bool:
    """``a`` and ``b`` compute ``γ`` and ``β`` from the same parameters the same way (a layer run more than
    once). Not their values: two modules that merely hold equal weights (both still ones) are two, since
    ``load`` replays this decision on a model whose weights are not yet its own."""
    return a is not None and (a is b or a.affine == b.affine)


def _channel_scale(node: fx.Node) -> tuple[fx.Node, fx.Node, torch.Tensor] | None:
    """``node = s ⊙ x`` with ``s`` a constant vector along ``x``'s last dim -> (node, x, s in float64);
    else None. (Called on the ops that stop a stream, which read or write it.)"""
    if not is_op(node, aten.mul) or len(node.args) != 2:
        return None
    for stream, other in (node.args, node.args[::-1]):
        scale = constant_value(other)
        if not isinstance(stream, fx.Node) or constant_value(stream) is not None or not isinstance(scale, torch.Tensor):
            continue
        width = val(stream).shape[-1]
        if scale.numel() == width and scale.shape[-1] == width and val(node).shape == val(stream).shape:
            return node, stream, scale.detach().reshape(width).to(torch.float64)
    return None


def _bridge_edge(blocker: Blocker, region: Region) -> tuple[fx.Node, fx.Node | None] | None:
    """The edge where an inserted ``I`` removes ``blocker`` (``Blocker.bridge``), or None. A centred
    stream's own vector is not bridged to a reader: it would see ``xC``, the mean lost."""
    if blocker.bridge is None:
        return None
    value, reader = blocker.bridge
    if reader is not None and region.needs_centring and value in region.nodes:
        return None
    return blocker.bridge


def _bridges_pay(gm: fx.GraphModule, region: Region, count: int) -> bool:
    """``count`` bridges of ``d × d`` pay for themselves: the weights that write and read the stream hold
    ``P ≥ 3·count·d²``, so slicing a quarter of it removes ``P/4``, at least the ``¾·count·d²`` the
    bridges keep. A value inside attention that only bridges would write and read has no such weights."""
    if not region.sinks or not any(s.use is not None for s in region.sources):
        return False
    weights = {s.use.weight for s in region.sources if s.use is not None} | {s.use.weight for s in region.sinks}
    held = sum(tensor_meta(gm, weight).numel() for weight in weights)
    return held >= 3 * count * region.width ** 2


def _where(node: fx.Node) -> str:
    """Inserted parameters are named after the module they serve, so every capture names them alike."""
    return module_path(node, plan_of(node.graph.owning_module).module_prefix)


def _centring_conflict(region: Region, uses: dict, bridged: set, streams: set) -> str | None:
    """Centring changes a source's weight; any other reader of that weight must be a sink we bridge, or a
    linear off every stream reading the centred axis (which gets the mean back)."""
    if not region.needs_centring:
        return None
    own = {s.node for s in region.sources} | bridged
    sides = {side for source in region.sources for side in source.sides()}
    for source in region.sources:
        if source.use is None:
            continue
        for use in uses.get(source.use.weight, ()):
            off_stream = use.node not in streams and use.in_axis is not None and use.input_side() in sides
            if use.node not in own and not off_stream:
                return (f"the weight {source.use.weight} of a stream source is also read by {use.node.format_node()}, "
                        "so the stream cannot be centred")
    return None


fuse_norm = FuseNorm()
"""The ready-made instance: ``compile(model, passes=[fuse_norm, ...])``."""
