"""rotate: give every residual state an orthogonal ``Q`` and fold it into the weights, exactly.

Per state (SliceGPT): sources ``W_out ← W_out Q_j``, sinks ``W_in ← Q_jᵀ W_in`` since
``(xQ)(QᵀW) = xW``. A skip edge from state ``i`` into an add of state ``j`` gets an inserted linear that
starts as the identity: it is a sink of ``i`` and a source of ``j``, so folding both rotations into it
leaves ``Q_iᵀ Q_j`` there with no special case. ``Rotate(shared=True)`` uses one ``Q`` per stream and
inserts nothing (QuaRot-style).

Where ``Q`` comes from is pluggable (``RotationSource``): a seeded random orthogonal matrix without
calibration data (exact, for tests), PCA of the activations when the pipeline has calibration data
(``fxslice.calibrate``). With calibration data, the ``slice`` that follows in the pipeline is applied to
each state right after its rotation, so the next state's PCA sees the sliced model (one sweep).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx

from ..analysis.mlps import find_mlps
from ..analysis.regions import SKIP_EDGE, Blocker, Region, State, bind_parameters, find_regions, written_by
from ..errors import UnsupportedGraphError
from ..graph import refresh_shapes, unique_parameters, val
from ..plan import Plan, StatePlan
from ..rewrite import insert_linear, rotate_state, slice_state
from .base import Context, FxslicePass, skipped_regions
from .fuse_norm import FuseNorm
from .shrink_mlp import PLANNED, ShrinkMLP

__all__ = ["ROTATED_STATE", "KeepWeights", "RandomRotation", "Rotate", "RotationSource", "random_orthogonal", "rotate"]

ROTATED_STATE = "fxslice.rotated_state"
"""``node.meta`` key on each rotated state's anchor: ``{"index": i, "width": d}``."""

KEPT_WHOLE = "not rotated: the slice that follows (slice(budget=…)) keeps every residual state whole"

Apply = Callable[[State, "torch.Tensor | None", "torch.Tensor | None"], int]


class RotationSource(Protocol):
    """Produces each state's ``Q`` (float64, ``d × d``) in graph order and hands it to ``apply``.

    ``apply(state, Q, eigenvalues)`` folds ``Q`` into the weights (and slices, if the pipeline slices in
    the same sweep) and returns the kept width; a source that caches activations transforms them with
    ``Q[:, :width]`` before going on. ``name`` is what the plan records as the states' ``q``.
    """

    name: str

    def run(self, gm: fx.GraphModule, states: list[State], apply: Apply) -> None: ...


def random_orthogonal(width: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass(frozen=True)
class RandomRotation:
    seed: int = 0
    name = "random"

    def run(self, gm: fx.GraphModule, states: list[State], apply: Apply) -> None:
        for index, state in enumerate(states):
            apply(state, random_orthogonal(state.width, self.seed * 1_000_003 + index), None)


@dataclass(frozen=True)
class KeepWeights:
    """Rotates nothing: rebuilds the structure (skip matrices) of a rotation whose weights are loaded
    afterwards (replaying a saved plan)."""

    name = "kept"

    def run(self, gm: fx.GraphModule, states: list[State], apply: Apply) -> None:
        for state in states:
            apply(state, None, None)


@dataclass(frozen=True)
class Rotate(FxslicePass):
    """Rotate every residual state by an orthogonal matrix folded into the adjacent weights.

    ``source`` replaces where ``Q`` comes from (default: PCA with calibration data, else seeded random).
    """

    shared: bool = False
    seed: int = 0
    strict: bool = False
    progress: bool = True
    source: RotationSource | None = field(default=None, compare=False)
    name = "rotate"
    requires = (FuseNorm,)

    def _source(self, context: Context, slicing: Any) -> RotationSource:
        if context.replay is not None:
            return KeepWeights()
        if self.source is not None:
            return self.source
        if not context.calibration:
            return RandomRotation(self.seed)
        from ..calibrate import RESCALE_EXPONENT, PCARotation

        rescale = RESCALE_EXPONENT if slicing is not None and slicing.rescale else 0.0
        return PCARotation(context.calibration, shared=self.shared, progress=self.progress, rescale=rescale)

    def _regions(self, gm: fx.GraphModule) -> list[Region]:
        return bind_parameters(gm, [_require_fused(r) for r in find_regions(gm, shared=self.shared)])

    def run(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:
        # With calibration data the following slice is applied inside this sweep (see the module docstring).
        slicing = context.following(self, "slice") if context.calibration and context.replay is None else None
        replayed = context.replay.details.get("rotate") if context.replay is not None else None
        if getattr(slicing, "budget", None) is not None:
            return self._budget(gm, plan, context, slicing)
        if replayed == KEPT_WHOLE:
            return plan.with_pass(self.spec(), details={"rotate": KEPT_WHOLE})
        return self._rotate(gm, plan, context, slicing)

    def _budget(self, gm: fx.GraphModule, plan: Plan, context: Context, slicing: Any) -> Plan:
        """Before ``slice(budget=…)`` every state keeps its width (per-state rotations would only add skip
        matrices), unless ``schedule="sensitivity"`` narrows the stream: then one rotation for the stream
        (shared: no skip matrices) and its width are chosen with the MLPs' widths from the losses both
        cost (``ShrinkMLP.plan_widths``), which the plan keeps for them under ``PLANNED``."""
        whole = plan.with_pass(self.spec(), details={"rotate": KEPT_WHOLE})
        if slicing.schedule != "sensitivity":
            return whole
        shared = dataclasses.replace(self, shared=True)
        streams = [s for r in shared._regions(gm) if not r.reason() for s in r.states]
        if len(streams) != 1:  # no stream, or several: the MLPs alone meet the budget (ShrinkMLP plans them)
            return whole
        mlps, _ = find_mlps(gm)
        planner = ShrinkMLP(budget=slicing.budget, multiple_of=slicing.multiple_of, schedule="sensitivity",
                            progress=self.progress)
        dense = plan.parameters_before or unique_parameters(gm)
        width, widths, losses = planner.plan_widths(gm, mlps, slicing.budget * dense, context, stream=streams[0])
        planned = {PLANNED: {"stream": width, "mlps": [[m.name, k] for m, k in zip(mlps, widths)], **losses}}
        if width == streams[0].width:
            return plan.with_pass(self.spec(), details={"rotate": KEPT_WHOLE, **planned})
        after = shared._rotate(gm, plan, context, slicing, widths={0: width})
        return dataclasses.replace(after, details={**after.details, **planned})

    def _rotate(self, gm: fx.GraphModule, plan: Plan, context: Context, slicing: Any,
                widths: dict[int, int] | None = None) -> Plan:
        regions = self._regions(gm)
        skipped = skipped_regions(regions, self.strict, "rotate")
        skips = 0 if self.shared else _insert_skips(gm, [r for r in regions if not r.reason()])
        if skips:
            refresh_shapes(gm)
            regions = self._regions(gm)
        states = sorted((s for r in regions if not r.reason() for s in r.states), key=_graph_order(gm))
        index = {state: i for i, state in enumerate(states)}
        source = self._source(context, slicing)
        if widths is None:
            widths = self._widths(gm, source, states, slicing, plan.parameters_before)
        if hasattr(source, "narrowed"):
            source.narrowed = frozenset(s for i, s in enumerate(states) if widths.get(i, s.width) < s.width)
        record: dict[int, StatePlan] = {}

        def apply(state: State, rotation: torch.Tensor | None, eigenvalues: torch.Tensor | None) -> int:
            i = index[state]
            width = widths.get(i, state.width)
            if rotation is not None:
                rotate_state(gm, state, rotation[:, :width])  # the first k columns of WQ are W Q[:, :k]
            slice_state(gm, state, width)
            state.anchor.meta[ROTATED_STATE] = {"index": i, "width": state.width}
            kept_variance = None
            if eigenvalues is not None:
                total = float(eigenvalues.clamp_min(0).sum())
                kept_variance = float(eigenvalues[:width].clamp_min(0).sum()) / total if total > 0 else 1.0
            record[i] = StatePlan(state=i, module=written_by(state, plan.module_prefix), width=state.width,
                                  sources=len(state.sources), sinks=len(state.sinks), q=source.name,
                                  kept=width if slicing is not None else None, kept_variance=kept_variance)
            return width

        start = time.perf_counter()
        source.run(gm, states, apply)
        seconds = time.perf_counter() - start
        gains = getattr(source, "gains", {})
        planned = tuple(dataclasses.replace(record[i], norm_gain=gains.get(s)) for i, s in enumerate(states))
        return plan.with_pass(self.spec(), rotation="shared" if self.shared else "per_state", states=planned,
                              skipped=plan.skipped + skipped, details={"rotate": {"skip_matrices": skips}},
                              timings={"rotate_s": round(seconds, 3),
                                       "eigh_s": round(getattr(source, "eigh_seconds", 0.0), 3)})

    @staticmethod
    def _widths(gm: fx.GraphModule, source: RotationSource, states: list[State], slicing: Any,
                dense: int | None) -> dict[int, int]:
        if slicing is None:
            return {}
        if slicing.schedule == "constant":
            return slicing.plan(gm, states, dense=dense)
        if not hasattr(source, "losses"):
            raise UnsupportedGraphError(f"slice(schedule={slicing.schedule!r}) reads the spectrum of the activations; "
                                        f"the rotation source {source.name!r} does not measure it")
        losses = source.losses(gm, states, at="readers") if slicing.schedule == "readers" else source.losses(gm, states)
        return slicing.plan(gm, states, losses, dense=dense)


def _graph_order(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda state: order[state.anchor]


def _insert_skips(gm: fx.GraphModule, regions) -> int:
    """Put an identity linear on every skip edge; rotating both ends turns it into ``Q_iᵀ Q_j``."""
    count = 0
    for region in regions:
        for origin, join in region.skips:
            width = val(origin).shape[-1]
            eye = torch.eye(width, dtype=val(origin).dtype)
            name = f"skip_{region.index}_{region.state_of[origin].index}_{region.state_of[join].index}"
            skip = insert_linear(gm, origin, eye, None, name, join)
            skip.meta[SKIP_EDGE] = True
            join.replace_input_with(origin, skip)
            count += 1
    return count


rotate = Rotate()
"""The ready-made instance: ``compile(model, passes=[fuse_norm, rotate, ...])``."""


def _require_fused(region: Region) -> Region:
    """A stream is rotated only if fuse_norm made all its norms weightless RMS norms: ``rms(xQ) = rms(x)Q``."""
    unfused = [n for n in region.norms if n.fused is None]
    if region.reason() or not unfused:
        return region
    blocker = Blocker(unfused[0].output, "this stream's norm still has its own scale or subtracts the mean, so it "
                      "does not commute with a rotation", "run fuse_norm before rotate; its log says why it left "
                      "this stream unchanged")
    return dataclasses.replace(region, blockers=region.blockers + (blocker,))
