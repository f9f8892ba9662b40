"""slice: keep the first ``k`` columns of each residual state's rotation.

Sources lose output columns, sinks lose input rows, skip matrices shrink to ``k_i × k_j`` and every width
written into the graph follows; norms keep dividing by the unsliced width. On a rotation from PCA the
first columns are the principal directions, so what is deleted is the stream's least-used subspace.

``slice(0.25)`` keeps ``k = (1 − 0.25)·d`` rounded down to a multiple of 8 in every state (SliceGPT's
constant schedule) except those the output head reads, which keep ``d`` as in SliceGPT unless that would
leave the model no smaller than dense (``head=True`` always slices them, ``head=False`` never does); ``slice(widths={state: k})``, ``slice(widths=[k0, k1, …])`` or
``slice(widths=lambda index, d: k)`` choose per state; ``slice(0.25, schedule="spectrum")`` spends the
parameter budget of ``slice(0.25)`` where the PCA spectrum says it matters (``Slice.plan``; needs
calibration data). ``schedule="readers"`` plans the same way from the loss of what each state's readers
compute (``PCARotation.losses(at="readers")``): for streams where a few very large directions hold nearly
all of every token's length, which the spectrum's loss cannot see past. Neither suits every model:
choose between them on validation text (docs/results.md).

``slice(budget=0.75)`` spends a parameter budget instead: the model ends with at most 0.75× the dense
parameter count (every parameter counted once). It keeps the residual stream whole (a preceding ``rotate``
then rotates nothing, since skip matrices would only add parameters) and shrinks the MLPs' inner widths
(``fxslice.passes.shrink_mlp``), every MLP keeping the same fraction of its channels; a budget the MLPs
alone cannot meet is refused. Needs calibration data. ``slice(budget=0.75, schedule="sensitivity")``
spreads the same budget unevenly: each MLP's refit error, measured along its removal path on the dense
model (fitted on every other calibration sequence, scored on the rest), is weighted feature by feature by
the loss's mean squared gradient at the MLP's output (one backward pass a sequence at a time: it holds
every activation of one calibration sequence), the widths even out those losses and then move halfway to
the uniform fraction. After a ``rotate`` (``[fuse_norm, rotate, slice(budget=…, schedule="sensitivity")]``)
the same schedule also prices narrowing the residual stream, under one rotation for the whole stream
(shared: no skip matrices): every write into the stream loses its part in the discarded principal
directions (fitted on the other fold), counted by the loss's gradient there, and the stream's width is
the one whose loss plus the MLPs' is least (``ShrinkMLP.plan_widths``). A model whose MLPs hold too
few of its parameters to meet the budget alone (a large vocabulary) is then compressed too. The stream's
loss is measured at the width chosen; the MLPs' stay first-order estimates, each token's error counted at
its own gradient (docs/design.md): an option, and a steep measured cut of the stream is warned about.

``rescale`` (on by default; calibrated slicing with one rotation per state): a sliced state's tokens keep
a fraction ``r = ‖xQ_k‖ / ‖x‖`` of their length and the norms reading it renormalise what is left, so
each token loses the deleted directions' share of every dot product its norm's sinks compute. Those
sinks (never the output head) are then multiplied by ``mean(r)^-p`` over the calibration tokens
(``fxslice.calibrate.RESCALE_EXPONENT``), which sharpens attention and gating back. The same gain makes
the dense model worse, so it corrects the slicing; how ``p`` was chosen is in docs/design.md.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ..analysis.ops import weight_use
from ..analysis.regions import State, bind_parameters, find_regions, output_heads
from ..errors import UnsupportedGraphError
from ..graph import unique_parameters
from ..plan import Plan
from ..rewrite import slice_state
from .base import Context, FxslicePass, StateParameters, kept_width
from .rotate import ROTATED_STATE, Rotate
from .shrink_mlp import ShrinkMLP, check_budget

__all__ = ["Slice", "slice"]

Widths = Mapping[int, int] | Sequence[int] | Callable[[int, int], int]
SCHEDULES = ("constant", "spectrum", "readers", "sensitivity")


@dataclass(frozen=True)
class Slice(FxslicePass):
    """Delete the least important directions of every rotated residual state."""

    ratio: float | None = None
    widths: Widths | None = field(default=None, compare=False)
    multiple_of: int = 8
    schedule: str = "constant"
    head: bool | None = None
    rescale: bool = True
    budget: float | None = None
    name = "slice"

    @property
    def requires(self) -> tuple:
        return () if self.budget is not None else (Rotate,)

    def __post_init__(self):
        if sum(x is not None for x in (self.ratio, self.widths, self.budget)) != 1:
            raise ValueError("slice needs exactly one of ratio=… (e.g. slice(0.25)), widths=… or budget=… "
                             "(e.g. slice(budget=0.75))")
        check_budget(self.budget)
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or math.isnan(self.ratio):
                raise ValueError(f"slice ratio must be a number in [0, 1); got {self.ratio!r}")
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"slice ratio must be in [0, 1): the fraction of each state's width to delete; "
                                 f"got {self.ratio}")
        if self.widths is not None and not (callable(self.widths) or isinstance(self.widths, (Mapping, list, tuple))):
            raise ValueError("slice widths must be a dict {state index: width}, a list of widths in state order or "
                             "a callable (index, width) -> width")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive integer; got {self.multiple_of!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule in ("spectrum", "readers") and self.ratio is None:
            raise ValueError(f"schedule={self.schedule!r} spends the budget of a ratio: give "
                             f"slice(ratio, schedule={self.schedule!r})")
        if self.schedule == "sensitivity" and self.budget is None:
            raise ValueError("schedule='sensitivity' spreads a parameter budget over the MLPs: give "
                             "slice(budget=…, schedule='sensitivity')")

    def width(self, index: int, d: int) -> int:
        """The width state ``index`` (of unsliced width ``d``) keeps."""
        if callable(self.widths):
            k = self.widths(index, d)
        elif isinstance(self.widths, Mapping):
            k = self.widths.get(index, d)
        elif self.widths is not None:
            k = self.widths[index] if index < len(self.widths) else d
        elif self.ratio == 0:
            k = d
        else:
            k = kept_width(1.0 - self.ratio, d, self.multiple_of)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
            raise UnsupportedGraphError(f"slice: width {k!r} for state {index} is not an integer in [1, {d}]")
        return k

    def plan(self, gm: fx.GraphModule, states: list[State], losses: list[torch.Tensor] | None = None,
             dense: int | None = None) -> dict[int, int]:
        """The width of every state (by index in graph order).

        The states the output head reads (the state feeding the head and, for a head tied to the
        embedding, the embedding's state) keep their full width, as in SliceGPT, whose head is never
        sliced (a sliced tied embedding projects the head onto the subspace of frequent tokens) — unless
        ``head=True``, or (``head=None``, the default) when keeping them would leave the model with no
        fewer parameters than ``dense``, its count before compression: a head tied to an embedding that
        holds most of the model (a vocabulary of a quarter million tokens) is then sliced like every other state.
        With ``schedule="spectrum"``, ``losses[i][k]`` is the fraction of state ``i``'s signal lost
        when it keeps ``k`` directions (measured on calibration tokens held out from the fit:
        ``PCARotation.losses``; with ``schedule="readers"``, of what the state's readers compute).
        Starting from every state unsliced, the planner repeatedly narrows (by ``multiple_of``) the state
        that will lose least after the cut, until the parameters bound to the states (skip matrices
        ``k_i × k_j`` included, counted exactly) are no more than with the constant schedule: it equalises
        the loss across states (minimising the largest), instead of equalising the widths.
        """
        budget = StateParameters(gm, states)
        pinned = set() if self.head or self.widths is not None else head_states(gm, states)
        if len(pinned) == len(states):
            pinned = set()  # one rotation for the whole stream (shared): the head's state is every state
        goal = [s.width if i in pinned else self.width(i, s.width) for i, s in enumerate(states)]
        if pinned and self.head is None and dense is not None:
            full = [s.width for s in states]
            if unique_parameters(gm) - budget.count(full) + budget.count(goal) >= dense:
                goal = [self.width(i, s.width) for i, s in enumerate(states)]
                pinned = set()
        if self.schedule == "constant":
            return dict(enumerate(goal))
        if losses is None:
            raise UnsupportedGraphError(f"slice(schedule={self.schedule!r}) needs calibration data")
        m = self.multiple_of
        widths = [s.width for s in states]
        limit = budget.count(goal)
        current = budget.count(widths)
        while current > limit:
            best = None
            for i, k in enumerate(widths):
                narrower = (k - 1) // m * m
                if i in pinned or narrower < builtins.min(m, states[i].width):
                    continue
                trial = widths[:i] + [narrower] + widths[i + 1:]
                saved = budget.count(widths, i) - budget.count(trial, i)
                if saved > 0:
                    score = float(losses[i][narrower])
                    if best is None or score < best[0]:
                        best = (score, i, narrower, saved)
            if best is None:
                break
            _, i, widths[i], saved = best
            current -= saved
        return dict(enumerate(widths))

    def needs_calibration(self) -> str | None:
        if self.budget is not None:
            return "slice(budget=…) chooses the MLPs' inner channels from activations"
        if self.schedule != "constant":
            return f"slice(schedule={self.schedule!r}) reads the spectrum of the activations"
        return None

    def back_propagates(self) -> bool:
        return self.schedule == "sensitivity"

    def run(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:
        if self.budget is not None:
            if context.replay is not None and plan.states:
                # The rotate before chose the stream's width with the MLPs' (``Rotate._budget``).
                plan = self._slice_states(gm, plan, context)
            inner = ShrinkMLP(budget=self.budget, multiple_of=self.multiple_of,
                              schedule=self.schedule)
            details, seconds = inner.shrink(gm, plan, context)
            return plan.with_pass(self.spec(), details={inner.name: details}, timings={"slice_s": seconds})
        if plan.states and all(s.kept is not None for s in plan.states):
            # A calibrated rotate already sliced each state as it went, with this pass's widths.
            return plan.with_pass(self._resolved_spec(plan))
        after = self._slice_states(gm, plan, context)
        return after.with_pass(self._resolved_spec(after))

    def _slice_states(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:
        """Cut every rotated state to this pass's width for it (replaying: the saved plan's)."""
        regions = bind_parameters(gm, find_regions(gm, shared=plan.rotation == "shared"))
        states = _rotated_states(regions)
        if context.replay is not None:
            widths = dict(enumerate(context.replay.widths))
            if len(widths) != len(states) or any(not 1 <= widths[i] <= s.width for i, s in enumerate(states)):
                raise UnsupportedGraphError(f"slice: the plan's widths {list(widths.values())} do not fit the "
                                            f"graph's {len(states)} states of widths {[s.width for s in states]}")
        else:
            widths = self.plan(gm, states, dense=plan.parameters_before)
        for index, state in enumerate(states):
            slice_state(gm, state, widths[index])
        kept = tuple(dataclasses.replace(s, kept=widths[s.state]) for s in plan.states)
        return dataclasses.replace(plan, states=kept)

    def _resolved_spec(self, plan: Plan):
        """Per-state widths given as a dict or a callable are recorded as the list they resolved to."""
        if self.widths is None:
            return self.spec()
        return self.spec(widths=[s.kept for s in plan.states])


def _rotated_states(regions) -> list[State]:
    states = [s for r in regions if not r.reason() for s in r.states if ROTATED_STATE in s.anchor.meta]
    return sorted(states, key=lambda s: s.anchor.meta[ROTATED_STATE]["index"])


def slice(  # noqa: A001
    ratio: float | None = None,
    *,
    widths: Widths | None = None,
    multiple_of: int = 8,
    schedule: str = "constant",
    head: bool | None = None,
    rescale: bool = True,
    budget: float | None = None,
) -> Slice:
    """``slice(0.25)``: the ``Slice`` pass (exported under this name and as the class ``Slice``)."""
    return Slice(ratio=ratio, widths=widths, multiple_of=multiple_of, schedule=schedule, head=head, rescale=rescale,
                 budget=budget)


def head_states(gm: fx.GraphModule, states: list[State]) -> set[int]:
    """Indices of the states the output head reads: through its input, or through a weight it shares."""
    heads = output_heads(gm)
    weights = {weight_use(h).weight for h in heads}
    pinned = set()
    for i, state in enumerate(states):
        nodes = [s.node for s in state.sources] + [s.use.node for s in state.sinks]
        if any(side.target in weights for side, _ in state.param_axes()) or any(u in heads for n in nodes for u in n.users):
            pinned.add(i)
    return pinned

