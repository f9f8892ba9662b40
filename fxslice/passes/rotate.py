"""rotate: give every residual state an orthogonal ``Q`` and fold it into the weights, exactly.

Per state (SliceGPT): sources ``W_out ← W_out Q_j``, sinks ``W_in ← Q_jᵀ W_in`` since
``(xQ)(QᵀW) = xW``. A skip edge from state ``i`` into an add of state ``j`` gets an inserted linear that
starts as the identity: it is a sink of ``i`` and a source of ``j``, so folding both rotations into it
leaves ``Q_iᵀ Q_j`` there with no special case. ``Rotate(shared=True)`` uses one ``Q`` per stream and
inserts nothing (QuaRot-style).

Where ``Q`` comes from is pluggable: a seeded random orthogonal matrix without calibration data (exact,
for tests), PCA of the activations when ``calibration`` is given (``fxslice.calibrate``). When a
``Slice`` is attached (``compile`` does this when ``slice`` follows ``rotate`` and there is calibration
data), each state is sliced right after its rotation, so the next state's PCA sees the sliced model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.fx as fx

from ..analysis.regions import SKIP_EDGE, Blocker, Region, State, bind_parameters, find_regions
from ..errors import UnsupportedGraphError, module_path
from ..graph import refresh_shapes, val
from ..rewrite import insert_linear, rotate_state, slice_state
from .base import FxslicePass, skipped_regions
from .fuse_norm import FuseNorm

__all__ = ["ROTATED_STATE", "ROTATION", "KeepWeights", "RandomRotation", "Rotate", "RotationSource", "random_orthogonal", "rotate"]

ROTATION = "fxslice.rotation"
"""``gm.meta`` key: how the graph was rotated (``shared``, where Q came from, whether it is sliced)."""
ROTATED_STATE = "fxslice.rotated_state"
"""``node.meta`` key on each rotated state's anchor: ``{"index": i, "width": d}``."""

Apply = Callable[[State, torch.Tensor, "torch.Tensor | None"], int]


class RotationSource(Protocol):
    """Produces each state's ``Q`` (float64, ``d × d``) in graph order and hands it to ``apply``.

    ``apply(state, Q, eigenvalues)`` folds ``Q`` into the weights (and slices, if asked) and returns the
    kept width; a source that caches activations transforms them with ``Q[:, :width]`` before going on.
    """

    def run(self, gm: fx.GraphModule, states: list[State], apply: Apply) -> None: ...


def random_orthogonal(width: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


@dataclass(frozen=True)
class RandomRotation:
    seed: int = 0

    def run(self, gm: fx.GraphModule, states: list[State], apply: Apply) -> None:
        for index, state in enumerate(states):
            apply(state, random_orthogonal(state.width, self.seed * 1_000_003 + index), None)


@dataclass(frozen=True)
class KeepWeights:
    """Rotates nothing: rebuilds the structure (skip matrices, widths) of a rotation whose weights are
    loaded afterwards (``fxslice.load``)."""

    def run(self, gm: fx.GraphModule, states: list[State], apply: Apply) -> None:
        for state in states:
            apply(state, None, None)


@dataclass(frozen=True)
class Rotate(FxslicePass):
    """Rotate every residual state by an orthogonal matrix folded into the adjacent weights."""

    shared: bool = False
    seed: int = 0
    calibration: Any = field(default=None, repr=False, compare=False)
    slicing: Any = None  # a Slice applied state by state during calibration
    strict: bool = False
    progress: bool = True
    rotation: Any = field(default=None, compare=False)  # a RotationSource that overrides the above
    name = "rotate"
    requires = (FuseNorm,)

    def source(self) -> RotationSource:
        if self.rotation is not None:
            return self.rotation
        if self.calibration is None:
            return RandomRotation(self.seed)
        from ..calibrate import RESCALE_EXPONENT, PCARotation

        rescale = RESCALE_EXPONENT if getattr(self.slicing, "rescale", False) else 0.0
        return PCARotation(self.calibration, shared=self.shared, progress=self.progress, rescale=rescale)

    def _regions(self, gm: fx.GraphModule) -> list[Region]:
        return bind_parameters(gm, [_require_fused(r) for r in find_regions(gm, shared=self.shared)])

    def run(self, gm: fx.GraphModule) -> dict[str, Any]:
        regions = self._regions(gm)
        skipped = skipped_regions(regions, self.strict, "rotate")
        skips = 0 if self.shared else _insert_skips(gm, [r for r in regions if not r.reason()])
        if skips:
            refresh_shapes(gm)
            regions = self._regions(gm)
        states = sorted((s for r in regions if not r.reason() for s in r.states), key=_graph_order(gm))
        index = {state: i for i, state in enumerate(states)}
        prefix = gm.meta.get("fxslice.module_prefix", "")
        record: list[dict[str, Any]] = []

        source = self.source()
        planned = self._plan(gm, source, states)

        def apply(state: State, rotation: torch.Tensor, eigenvalues: torch.Tensor | None) -> int:
            i = index[state]
            width = planned.get(i, state.width)
            if rotation is not None:
                rotate_state(gm, state, rotation[:, :width])  # the first k columns of WQ are W Q[:, :k]
            slice_state(gm, state, width)
            state.anchor.meta[ROTATED_STATE] = {"index": i, "width": state.width}
            entry = {"state": i, "after": _written_by(state, prefix), "width_before": state.width,
                     "width_after": width, "sources": len(state.sources), "sinks": len(state.sinks)}
            if eigenvalues is not None:
                total = float(eigenvalues.clamp_min(0).sum())
                entry["kept_variance"] = float(eigenvalues[:width].clamp_min(0).sum()) / total if total > 0 else 1.0
            record.append(entry)
            return width

        start = time.perf_counter()
        source.run(gm, states, apply)
        seconds = time.perf_counter() - start
        for entry in record:
            gain = getattr(source, "gains", {}).get(states[entry["state"]])
            if gain is not None:
                entry["norm_gain"] = gain
        kind = type(source).__name__
        gm.meta[ROTATION] = {"shared": self.shared, "q": {"PCARotation": "pca", "RandomRotation": "random"}.get(kind, kind),
                             "sliced_by": "rotate" if self.slicing is not None else None}
        return {"shared": self.shared, "q": gm.meta[ROTATION]["q"], "skip_matrices": skips,
                "rotate_s": round(seconds, 3), "eigh_s": round(getattr(source, "eigh_seconds", 0.0), 3),
                "states": sorted(record, key=lambda e: e["state"]), "skipped": skipped}


    def _plan(self, gm: fx.GraphModule, source: RotationSource, states: list[State]) -> dict[int, int]:
        if self.slicing is None:
            return {}
        if getattr(self.slicing, "schedule", "constant") == "constant":
            return self.slicing.plan(gm, states)
        if not hasattr(source, "losses"):
            raise UnsupportedGraphError(f"slice(schedule={self.slicing.schedule!r}) needs calibration data")
        return self.slicing.plan(gm, states, source.losses(gm, states))


def _written_by(state: State, prefix: str) -> str:
    """The module that last writes the state (``model.layers.3.mlp.down_proj``): how reports name it."""
    own = [s.node for s in state.sources if not s.coupled and not s.node.meta.get(SKIP_EDGE)]
    return module_path(own[-1] if own else state.anchor, prefix)


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
