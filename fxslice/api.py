"""The public verb ``compile`` and the ``report`` it leaves behind."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .capture import capture, is_hf_causal_lm
from .graph import unique_parameters
from .model import SlicedCausalLM, graph_module
from .passes.base import APPLIED, LOG, FxslicePass, _order_problems, run_passes
from .passes.fuse_norm import fuse_norm
from .passes.rotate import Rotate, rotate
from .passes.slice import Slice
from .passes.slice import slice as slice_pass
from .errors import PassOrderError

__all__ = ["compile", "report"]

PARAMETERS_BEFORE = "fxslice.parameters_before"


def _bind_calibration(passes: list[FxslicePass], calibration: Any) -> list[FxslicePass]:
    """Give ``rotate`` the calibration data, and the ``slice`` after it, so both run in one sweep."""
    bound = list(passes)
    for i, p in enumerate(bound):
        if isinstance(p, Rotate):
            following = next((q for q in bound[i + 1:] if isinstance(q, Slice)), None)
            bound[i] = dataclasses.replace(p, calibration=calibration, slicing=following)
    return bound


def compile(  # noqa: A001 - the library's one verb
    model: torch.nn.Module,
    passes: Sequence[FxslicePass] = (fuse_norm, rotate, slice_pass(0.25)),
    *,
    example_inputs: Any = None,
    calibration: Any = None,
) -> torch.nn.Module:
    """Capture ``model``, run ``passes`` on its graph and return the rewritten model.

    A Hugging Face causal LM comes back as a ``SlicedCausalLM`` (``.config``, ``out.logits``); any other
    module comes back as the rewritten ``torch.fx.GraphModule``, callable like the original. The model
    passed in is not modified. ``calibration`` (batches of model inputs) makes ``rotate`` use PCA of the
    activations instead of random rotations. ``fxslice.report(result)`` describes what was done.
    """
    passes = list(passes)
    problems = _order_problems(passes, [])
    if problems:
        raise PassOrderError("the pass list is not in a valid order: " + "; ".join(problems))
    if calibration is not None:
        from .calibrate import check_calibration

        calibration = check_calibration(calibration, model, hf=is_hf_causal_lm(model))
        passes = _bind_calibration(passes, calibration)
    gm = capture(model, example_inputs)
    gm.meta[PARAMETERS_BEFORE] = unique_parameters(model)
    run_passes(gm, passes)
    if is_hf_causal_lm(model):
        return SlicedCausalLM(gm, model.config)
    return gm


def report(model: torch.nn.Module) -> dict[str, Any]:
    """What ``compile`` did, as JSON-serialisable data.

    ``states``: every residual state with its width before and after (and the variance kept, with PCA);
    ``skipped``: regions left alone and why; ``parameters``: counts before and after, every parameter
    counted once, inserted skip / bridge matrices included.
    """
    gm = graph_module(model)
    log = gm.meta.get(LOG, {})
    states: dict[int, dict[str, Any]] = {}
    for entry in log.get("rotate", {}).get("states", []):
        states[entry["state"]] = dict(entry)
    for entry in log.get("slice", {}).get("states", []):
        states.setdefault(entry["state"], {}).update(entry)
    skipped = []
    for name in ("fuse_norm", "rotate"):
        for entry in log.get(name, {}).get("skipped", []):
            skipped.append({"pass": name, **entry})
    before = gm.meta.get(PARAMETERS_BEFORE)
    after = unique_parameters(gm)
    return {
        "model": gm.meta.get("fxslice.model_class"),
        "passes": list(gm.meta.get(APPLIED, [])),
        "fuse_norm": log.get("fuse_norm"),
        "rotation": {k: v for k, v in log.get("rotate", {}).items() if k not in ("states", "skipped")} or None,
        "states": [states[i] for i in sorted(states)],
        "skipped": skipped,
        "parameters": {"before": before, "after": after, "ratio": (after / before) if before else None},
    }

