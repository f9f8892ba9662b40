"""The compression plan: one frozen, JSON-round-trippable record of what was done to a captured graph.

Every layer reads it: ``fxslice.report`` prints it, ``fxslice.save`` writes it, ``fxslice.load`` and the
KV-cache decoder replay its passes on a fresh capture, the CLI shows it. It lives under one ``gm.meta``
key (``PLAN``); passes read the plan they find and leave a new one (``with_pass``), never mutate it.

* ``passes``: the passes applied, in order, each with its JSON-expressible options (``PassSpec``); replay
  builds them again through ``fxslice.passes.REGISTRY``.
* ``rotation``: ``"per_state"`` (one ``Q`` per residual state, skip matrices between them), ``"shared"``
  (one ``Q`` per stream) or None.
* ``states``: per residual state, in graph order: the module that writes it, its width, where its ``Q``
  came from and the width a slice kept (None while unsliced).
* ``skipped``: every region a pass left unchanged, with the reason.
* ``details``: what each pass found (regions, bridges, inserted matrices), and ``timings``, which are not
  part of a plan's identity: two runs of the same passes give equal plans.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

__all__ = ["PLAN", "PassSpec", "Plan", "Skipped", "StatePlan", "plan_of", "set_plan"]

PLAN = "fxslice.plan"
"""``gm.meta`` key holding the graph's ``Plan``."""

FORMAT = 2


def _frozen(value: Any) -> Any:
    """JSON data with lists as tuples, so an option value is hashable and compares after a round trip."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class PassSpec:
    """A pass by registry name and its options (the dataclass fields JSON can express)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.options}


@dataclass(frozen=True)
class StatePlan:
    """One residual state: who writes it, its width, where its ``Q`` came from and the width it keeps."""

    state: int
    module: str
    width: int
    sources: int
    sinks: int
    q: str | None = None  # "pca", "random", or the RotationSource's name; None until rotated
    kept: int | None = None  # the width a slice kept; None while unsliced
    kept_variance: float | None = None  # of the PCA spectrum, in the kept directions
    norm_gain: float | None = None  # rescaling of the norms' sinks after slicing


@dataclass(frozen=True)
class Skipped:
    """A region a pass left unchanged, and why."""

    pass_name: str
    region: int
    width: int
    reason: str


@dataclass(frozen=True)
class Plan:
    model_class: str
    kind: str = "module"  # "causal_lm" for a Hugging Face causal LM captured as (input_ids, attention_mask)
    module_prefix: str = ""  # prefix of parameter names that reports strip ("model." for causal LMs)
    parameters_before: int | None = None
    capture_length: int | None = None  # a causal LM's example sequence length (load captures it there again)
    passes: tuple[PassSpec, ...] = ()
    rotation: str | None = None
    states: tuple[StatePlan, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    details: dict[str, Any] = field(default_factory=dict, hash=False)
    timings: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def class_name(self) -> str:
        """The model class's name without its module (``model_class`` is ``module.Class``)."""
        return self.model_class.rsplit(".", 1)[-1]

    @property
    def applied(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.passes)

    @property
    def widths(self) -> tuple[int, ...]:
        """The width every state has now (its kept width, or its full width while unsliced)."""
        return tuple(s.width if s.kept is None else s.kept for s in self.states)

    def with_pass(self, spec: PassSpec, **changes: Any) -> Plan:
        """The plan after one more pass: ``spec`` appended, ``details`` and ``timings`` merged."""
        details = {**self.details, **changes.pop("details", {})}
        timings = {**self.timings, **changes.pop("timings", {})}
        return dataclasses.replace(self, passes=self.passes + (spec,), details=details, timings=timings, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passes"] = [{"name": p.name, "options": p.kwargs} for p in self.passes]
        return {"format": FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"not a format-{FORMAT} fxslice plan")
        passes = tuple(PassSpec(p["name"], tuple((k, _frozen(v)) for k, v in p["options"].items()))
                       for p in data.pop("passes"))
        states = tuple(StatePlan(**s) for s in data.pop("states"))
        skipped = tuple(Skipped(**s) for s in data.pop("skipped"))
        return cls(passes=passes, states=states, skipped=skipped, **data)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def plan_of(gm: fx.GraphModule) -> Plan:
    """The plan of a graph made by ``fxslice.capture``, or of what ``fxslice.compile`` / ``load`` returned
    (an empty plan for any other GraphModule)."""
    gm = getattr(gm, "graph_module", gm)  # a SlicedCausalLM holds its graph
    plan = gm.meta.get(PLAN)
    return plan if plan is not None else Plan(model_class=type(gm).__qualname__)


def set_plan(gm: fx.GraphModule, plan: Plan) -> None:
    gm.meta[PLAN] = plan
