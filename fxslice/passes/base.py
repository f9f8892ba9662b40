"""What every fxslice pass shares: declared order, the pipeline context, the checks after each pass.

A pass is a frozen dataclass of options and a callable ``GraphModule -> PassResult`` (torch.fx's own
type), so it also runs under ``torch.fx.passes.infra.pass_manager.PassManager``. Order is data:
``requires`` names the passes that must have run before; ``run_passes`` checks the whole list before
anything runs and reports every violation at once. Each pass reads the graph's ``Plan`` and leaves a new
one with its own ``PassSpec`` appended.

Calibration data is not an option of any pass: it is the *context* of a pipeline, attached to the graph
for the time the passes run (``calibrated``; ``run_passes(..., calibration=)`` and ``fxslice.compile``
attach it the same way). The context also holds the pass list, because a calibrated ``rotate`` computes
each state's ``Q`` from activations of the model whose earlier states are already sliced, so it applies
the ``slice`` that follows it state by state inside its own sweep. Replaying a saved plan is a context
too: the passes then rebuild the structure (skip matrices, widths) the plan records, computing nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..analysis.regions import find_regions
from ..errors import PassOrderError, UnsupportedGraphError
from ..graph import eliminate_dead_code, graph_device, refresh_shapes, tensor_meta, remove_unused_attributes
from ..plan import PassSpec, Plan, Skipped, plan_of, set_plan

__all__ = ["CONTEXT", "Context", "FxslicePass", "PassResult", "StateParameters", "calibrated", "check_invariants",
           "context_of", "kept_width", "order_problems", "recorded", "replaying", "run_passes", "skipped_regions"]

CONTEXT = "fxslice.context"
"""``gm.meta`` key of the ``Context`` while a pipeline runs (never saved)."""

_JSON = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Context:
    """What a pipeline's passes may read besides the graph: calibration batches (validated, see
    ``fxslice.calibrate.check_calibration``), the pass list they serve, or a plan being replayed."""

    calibration: tuple = ()
    passes: tuple = ()
    replay: Plan | None = None

    def following(self, p: Any, name: str) -> Any:
        """The first pass called ``name`` after ``p`` in the pipeline, or None."""
        later = False
        for q in self.passes:
            if later and q.name == name:
                return q
            later = later or q is p
        return None


def kept_width(fraction: float, width: int, multiple_of: int) -> int:
    """``fraction · width`` rounded down to a multiple of ``multiple_of`` (fast matmuls), but never below
    one multiple (or ``width``, if smaller)."""
    return max(math.floor(fraction * width / multiple_of) * multiple_of, min(multiple_of, width))


class StateParameters:
    """Counts the parameters bound to the residual states' widths (every weight axis a state's Q touches,
    skip matrices ``k_i × k_j`` included) and, given ``mlps``, to their inner widths, for any choice of
    widths: a weight's elements are the product of its axes at the chosen widths."""

    def __init__(self, gm: fx.GraphModule, states: Sequence[Any], mlps: Sequence[Any] = ()):
        self.bound: dict[tuple[str, int], tuple[int, int]] = {}  # axis -> (state, copies of its width)
        for i, state in enumerate(states):
            for side, _ in state.param_axes():
                self.bound[(side.target, side.axis)] = (i, side.blocks)
        self.inner: dict[tuple[str, int], tuple[int, int]] = {}  # axis -> (MLP, copies of its channels)
        for i, mlp in enumerate(mlps):
            for side in (*mlp.channel_sides, mlp.down.input_side()):
                self.inner[(side.target, side.axis)] = (i, side.blocks)
        targets = dict.fromkeys(t for t, _ in (*self.bound, *self.inner))
        self.shapes = {target: tuple(tensor_meta(gm, target).shape) for target in targets}
        self.touching: dict[int, list[str]] = {i: [] for i in range(len(states))}
        for target, shape in self.shapes.items():
            for i in {self.bound[(target, a)][0] for a in range(len(shape)) if (target, a) in self.bound}:
                self.touching[i].append(target)

    def count(self, widths: Sequence[int], state: int | None = None, inner: Sequence[int] | None = None) -> int:
        """Elements of the bound weights (only those touching ``state``, if given) at the states' ``widths``
        and the MLPs' ``inner`` widths (full when None)."""
        def size(target: str, axis: int, n: int) -> int:
            if (target, axis) in self.bound:
                state, copies = self.bound[(target, axis)]
                return widths[state] * copies
            if inner is not None and (target, axis) in self.inner:
                mlp, copies = self.inner[(target, axis)]
                return inner[mlp] * copies
            return n

        targets = self.shapes if state is None else self.touching[state]
        return sum(math.prod(size(t, a, n) for a, n in enumerate(self.shapes[t])) for t in targets)

    def per_channel(self, widths: Sequence[int], full: Sequence[int]) -> list[int]:
        """Parameters per inner channel of each MLP (every expert's, for 3-D weights) at the states'
        ``widths``, the MLPs at their ``full`` widths: an up projection's row is as wide as the stream."""
        whole = self.count(widths, inner=full)
        return [whole - self.count(widths, inner=[*full[:i], m - 1, *full[i + 1:]]) for i, m in enumerate(full)]


def context_of(gm: fx.GraphModule) -> Context:
    return gm.meta.get(CONTEXT) or Context()


@contextlib.contextmanager
def _attached(gm: fx.GraphModule, context: Context) -> Iterator[fx.GraphModule]:
    previous = gm.meta.get(CONTEXT)
    gm.meta[CONTEXT] = context
    try:
        yield gm
    finally:
        if previous is None:
            gm.meta.pop(CONTEXT, None)
        else:
            gm.meta[CONTEXT] = previous


def calibrated(gm: fx.GraphModule, calibration: Any, passes: Sequence[Any]):
    """Context manager: while it is open, ``passes`` run on ``gm`` calibrate on ``calibration``.

    This is how torch's ``PassManager`` gets the data::

        passes = [fuse_norm, rotate, slice(0.25)]
        with fxslice.passes.calibrated(gm, batches, passes):
            gm = PassManager(passes)(gm).graph_module

    ``calibration`` is validated against the graph's inputs first and the memory the sweep will need is
    estimated (``fxslice.memory``): ``CalibrationError`` before anything changes when either fails. When
    only the sweep's cached activations would not fit, they are kept on disk instead.
    ``run_passes(gm, passes, calibration=batches)`` and ``fxslice.compile`` do exactly this.
    """
    from ..calibrate import check_calibration
    from ..distributed import agreed, rank
    from ..memory import calibration_estimate, check_fits, describe, fits

    batches = check_calibration(calibration, gm, hf=plan_of(gm).kind == "causal_lm")
    estimate = calibration_estimate(gm, list(batches), backward=any(p.back_propagates() for p in passes
                                                                   if isinstance(p, FxslicePass)))
    # When the sweep's cached values would not fit, they wait on disk, one batch's in memory at a time.
    device = graph_device(gm)  # its memory is what the sweep fills
    spill = not fits(estimate, device)
    if spill:
        estimate = dict(estimate, cached=estimate["cached"] // len(batches))
        batches = batches.on_disk()
    agreed(lambda: check_fits(estimate, f"calibrating on {len(batches)} batches",
                              "use fewer or shorter calibration sequences (CLI: --samples, --seq-len), smaller "
                              "batches (--batch-size), or more processes (under torchrun each holds only its share "
                              "of the batches)", device))
    # Reported with the progress bars (unless a pass turned them off), by one process, not each.
    if rank() == 0 and all(getattr(p, "progress", True) for p in passes):
        where = ", with the cached activations on disk" if spill else ""
        print(f"fxslice: calibration will need about {describe(estimate)} beyond the model{where}", file=sys.stderr)
    return _attached(gm, Context(calibration=batches, passes=tuple(passes)))


def replaying(gm: fx.GraphModule, plan: Plan):
    """Context manager: passes run inside it rebuild the structure ``plan`` records, without computing
    rotations (the weights are loaded afterwards)."""
    return _attached(gm, Context(replay=plan))


class FxslicePass:
    """Base of the fxslice passes. Subclasses set ``name`` and ``requires`` and implement ``run``."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[type, ...]] = ()

    def run(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:  # pragma: no cover - abstract
        """Rewrite ``gm`` and return ``plan`` with this pass's changes (``Plan.with_pass(self.spec(), ...)``)."""
        raise NotImplementedError

    def needs_calibration(self) -> str | None:
        """Why this pass cannot run without calibration data, or None when it can."""
        return None

    def back_propagates(self) -> bool:
        """Whether the pass runs a backward pass through the graph on calibration sequences (which holds
        every activation of a sequence at once)."""
        return False

    def spec(self, **resolved: Any) -> PassSpec:
        """This pass and its JSON-expressible options (``resolved`` replaces options only known after running)."""
        options = {}
        for f in dataclasses.fields(self) if dataclasses.is_dataclass(self) else ():
            value = resolved.get(f.name, getattr(self, f.name))
            if isinstance(value, _JSON) or (isinstance(value, (list, tuple)) and all(isinstance(v, _JSON) for v in value)):
                options[f.name] = tuple(value) if isinstance(value, list) else value
        return PassSpec(self.name, tuple(options.items()))

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        plan = plan_of(gm)
        problems = order_problems([self], plan.applied)
        if problems:
            raise PassOrderError("cannot run this pass here: " + "; ".join(problems))
        context = context_of(gm)
        why = self.needs_calibration()
        if why and not context.calibration and context.replay is None:
            raise UnsupportedGraphError(_calibration_hint(self, why))
        after = self.run(gm, plan, context)
        eliminate_dead_code(gm)
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        refresh_shapes(gm)
        set_plan(gm, after)
        check_invariants(gm)
        return PassResult(gm, True)


def _calibration_hint(p: FxslicePass, why: str) -> str:
    return (f"{p.name}: {why}. Give calibration data: fxslice.compile(model, passes, calibration=batches), "
            "fxslice.passes.run_passes(gm, passes, calibration=batches), or under torch's PassManager "
            "`with fxslice.passes.calibrated(gm, batches, passes): PassManager(passes)(gm)`")


def order_problems(passes: Sequence[Any], applied: Sequence[str]) -> list[str]:
    """Every way ``passes``, run after the passes named in ``applied``, break the declared order."""
    problems = []
    done = list(applied)
    for position, p in enumerate(passes):
        name = getattr(p, "name", None)
        if not isinstance(p, FxslicePass):
            problems.append(f"item {position} ({p!r}) is not an fxslice pass")
            continue
        for required in p.requires:
            if required.name not in done:
                problems.append(f"'{name}' (position {position}) needs '{required.name}' to run before it")
        if name in done:
            problems.append(f"'{name}' (position {position}) runs twice; each pass can be applied once")
        done.append(name)
    return problems


def check_pipeline(passes: Sequence[Any], applied: Sequence[str], calibration: bool) -> None:
    """Raise before anything runs: ``PassOrderError`` listing every order violation, or
    ``UnsupportedGraphError`` for a pass that needs calibration data when there is none."""
    problems = order_problems(passes, applied)
    if problems:
        raise PassOrderError("the pass list is not in a valid order: " + "; ".join(problems))
    for p in passes:
        why = p.needs_calibration()
        if why and not calibration:
            raise UnsupportedGraphError(_calibration_hint(p, why))


def run_passes(gm: fx.GraphModule, passes: Sequence[FxslicePass], calibration: Any = None) -> fx.GraphModule:
    """Run ``passes`` on ``gm`` in order, calibrating on ``calibration`` (batches of model inputs) if given.

    The order and the need for calibration are checked before anything runs; a failure names the pass
    and those before it. The same passes and data give the same model as ``fxslice.compile``.
    """
    passes = list(passes)
    check_pipeline(passes, plan_of(gm).applied, calibration is not None or context_of(gm).replay is not None)
    attached = calibrated(gm, calibration, passes) if calibration is not None else contextlib.nullcontext()
    with attached:
        for position, p in enumerate(passes):
            try:
                p(gm)
            except UnsupportedGraphError:
                raise
            except Exception as error:
                before = ", ".join(q.name for q in passes[:position]) or "none"
                raise RuntimeError(
                    f"fxslice pass '{p.name}' failed (passes before it: {before}); this is a bug in fxslice, "
                    f"please report it with the model: {type(error).__name__}: {error}"
                ) from error
    return gm


def recorded(context: Context, pass_name: str, key: str, names: list[str], what: str) -> dict:
    """Replaying: the kept width (or channels) the plan records for each name under
    ``details[pass_name][key]`` (rows ``[name, before, after]``); the graph must have exactly ``names``."""
    rows = {name: kept for name, _, kept in context.replay.details.get(pass_name, {}).get(key, ())}
    if sorted(rows) != sorted(names):
        raise UnsupportedGraphError(f"{pass_name}: the plan records the {what} {sorted(rows)}, the graph has "
                                    f"{sorted(names)}")
    return rows


def skipped_regions(regions, strict: bool, what: str) -> tuple[Skipped, ...]:
    """Log (or, with ``strict``, raise for) every region that cannot be transformed."""
    if not regions:
        raise UnsupportedGraphError(
            f"{what}: the graph has no residual stream (no normalisation reads a value that a residual add "
            "joins); fxslice compresses pre-norm transformer models"
        )
    skipped = tuple(Skipped(what, r.index, r.width, r.reason()) for r in regions if r.reason())
    if skipped and strict:
        raise UnsupportedGraphError(f"{what}: " + " | ".join(s.reason for s in skipped))
    if skipped and len(skipped) == len(regions):
        raise UnsupportedGraphError(f"{what}: no residual stream can be transformed: "
                                    + " | ".join(s.reason for s in skipped))
    for s in skipped:
        warnings.warn(f"fxslice {what}: region {s.region} left unchanged: {s.reason}", stacklevel=3)
    return skipped


def check_invariants(gm: fx.GraphModule) -> None:
    """Every residual state agrees on one width: its values and every weight axis bound to it."""
    regions = find_regions(gm, shared=plan_of(gm).rotation == "shared")
    for region in regions:
        if region.reason():
            continue
        for state in region.states:
            for node in state.nodes:
                v = node.meta.get("val")
                if v is not None and hasattr(v, "shape") and v.dim() and v.shape[-1] != state.width:
                    raise AssertionError(f"state {state.index} of region {region.index} mixes widths: "
                                         f"{node.format_node()} has last dim {v.shape[-1]}, expected {state.width}")
            for side, _ in state.param_axes():
                size = tensor_meta(gm, side.target).shape[side.axis]
                if size != state.width * side.blocks:
                    raise AssertionError(f"state {state.index} of region {region.index} has width {state.width} "
                                         f"but {side.target} axis {side.axis} has size {size}")
