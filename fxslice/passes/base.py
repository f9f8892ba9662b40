"""What every fxslice pass shares: declared order, the checks after each pass, and its log entry.

A pass is a callable ``GraphModule -> PassResult`` (torch.fx's own type), so it also runs under
``torch.fx.passes.infra.pass_manager.PassManager``. Order is data: ``requires`` names the passes that
must have run before; ``run_passes`` checks the whole list before anything runs and reports every
violation at once.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..analysis.regions import find_regions
from ..errors import PassOrderError, UnsupportedGraphError
from ..graph import eliminate_dead_code, get_tensor, refresh_shapes, remove_unused_attributes

__all__ = ["APPLIED", "LOG", "RECIPE", "FxslicePass", "PassResult", "check_invariants", "run_passes", "skipped_regions"]

APPLIED = "fxslice.applied"
"""``gm.meta`` key: names of the passes applied so far, in order."""
LOG = "fxslice.log"
"""``gm.meta`` key: per-pass JSON-serialisable records, read by ``fxslice.report``."""
RECIPE = "fxslice.recipe"
"""``gm.meta`` key: the passes applied with their options (``FxslicePass.spec``), saved by ``fxslice.save``."""


class FxslicePass:
    """Base of the fxslice passes. Subclasses set ``name`` and ``requires`` and implement ``run``."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[type, ...]] = ()

    def run(self, gm: fx.GraphModule) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The pass and its JSON-expressible options (data and callables are left out)."""
        options = {}
        for f in dataclasses.fields(self) if dataclasses.is_dataclass(self) else ():
            value = getattr(self, f.name)
            if value is None or isinstance(value, (bool, int, float, str)):
                options[f.name] = value
        return {"name": self.name, **options}

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        applied = gm.meta.setdefault(APPLIED, [])
        problems = _order_problems([self], applied)
        if problems:
            raise PassOrderError("cannot run this pass here: " + "; ".join(problems))
        record = self.run(gm)
        eliminate_dead_code(gm)
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        refresh_shapes(gm)
        applied.append(self.name)
        gm.meta.setdefault(RECIPE, []).append(self.spec())
        gm.meta.setdefault(LOG, {})[self.name] = record
        check_invariants(gm)
        return PassResult(gm, bool(record.get("modified", True)))


def _order_problems(passes: Sequence[Any], applied: Sequence[str]) -> list[str]:
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


def run_passes(gm: fx.GraphModule, passes: Sequence[FxslicePass]) -> fx.GraphModule:
    """Run ``passes`` in order after checking the order; a failure names the pass and those before it."""
    problems = _order_problems(passes, gm.meta.get(APPLIED, []))
    if problems:
        raise PassOrderError("the pass list is not in a valid order: " + "; ".join(problems))
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


def skipped_regions(regions, strict: bool, what: str) -> list[dict[str, Any]]:
    """Log (or, with ``strict``, raise for) every region that cannot be transformed."""
    if not regions:
        raise UnsupportedGraphError(
            f"{what}: the graph has no residual stream (no normalisation reads a value that a residual add "
            "joins); fxslice compresses pre-norm transformer models"
        )
    skipped = [{"region": r.index, "width": r.width, "reason": r.reason()} for r in regions if r.reason()]
    if skipped and strict:
        raise UnsupportedGraphError(f"{what}: " + " | ".join(s["reason"] for s in skipped))
    if skipped and len(skipped) == len(regions):
        raise UnsupportedGraphError(f"{what}: no residual stream can be transformed: "
                                    + " | ".join(s["reason"] for s in skipped))
    for s in skipped:
        warnings.warn(f"fxslice {what}: region {s['region']} left unchanged: {s['reason']}", stacklevel=3)
    return skipped


def check_invariants(gm: fx.GraphModule) -> None:
    """Every residual state agrees on one width: its values and every weight axis bound to it."""
    rotated = gm.meta.get("fxslice.rotation")
    regions = find_regions(gm, shared=bool(rotated and rotated.get("shared")))
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
                size = get_tensor(gm, side.target).shape[side.axis]
                if size != state.width:
                    raise AssertionError(f"state {state.index} of region {region.index} has width {state.width} "
                                         f"but {side.target} axis {side.axis} has size {size}")
