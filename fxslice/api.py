"""The public verb ``compile`` and the ``report`` of what it did (read from the graph's plan)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch

from .calibrate import check_calibration
from .capture import HF_PREFIX, capture, example_like, is_hf_causal_lm, refusal
from .graph import unique_parameters
from .model import SlicedCausalLM, graph_module
from .passes import FxslicePass, fuse_norm, rotate, run_passes
from .passes import slice as slice_pass
from .passes.base import check_pipeline
from .plan import plan_of
from .streaming import DEFAULT_BUDGET, attach, open_checkpoint

__all__ = ["compile", "report"]


def compile(  # noqa: A001 - the library's one verb
    model: torch.nn.Module | str | os.PathLike,
    passes: Sequence[FxslicePass] = (fuse_norm, rotate, slice_pass(0.25)),
    *,
    example_inputs: Any = None,
    calibration: Any = None,
    stream_budget: int = DEFAULT_BUDGET,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Capture ``model``, run ``passes`` on its graph and return the rewritten model.

    A Hugging Face causal LM comes back as a ``SlicedCausalLM`` (``.config``, ``out.logits``); any other
    module comes back as the rewritten ``torch.fx.GraphModule``, callable like the original. The model
    passed in is not modified. ``calibration`` (batches of model inputs) makes ``rotate`` use PCA of the
    activations instead of random rotations. The same as
    ``fxslice.passes.run_passes(fxslice.capture(model, example_inputs), passes, calibration=calibration)``,
    with the pass list and the calibration data checked before the model is captured.

    ``model`` may also be the path of a Hugging Face safetensors checkpoint: its weights then stream
    (``fxslice.streaming``), in ``dtype`` (default float32) onto ``device`` (default the CPU), at most
    ``stream_budget`` bytes of them in memory at once, and the result keeps them in the store until
    ``fxslice.save`` writes them shard by shard (calling the result first reads them all into memory).
    A model in memory computes where its weights are (``model.to(device, dtype)`` before ``compile``);
    calibration batches are moved to that device.
    """
    passes = list(passes)
    check_pipeline(passes, (), calibration is not None)
    store = None
    if isinstance(model, (str, os.PathLike)):
        model, store = open_checkpoint(model, dtype=dtype or torch.float32, device=device or "cpu", budget=stream_budget)
    elif dtype is not None or device is not None:
        raise ValueError("dtype and device choose how a checkpoint path is streamed; move a model in memory "
                         "yourself (model.to(device, dtype)) before compiling it")
    if calibration is not None:
        calibration = check_calibration(calibration, model, hf=is_hf_causal_lm(model))
    gm = capture(model, example_inputs)
    if calibration is not None and example_inputs is None and is_hf_causal_lm(model):
        args, kwargs = calibration[0]
        if refusal(gm, args, kwargs) is not None:
            # The model's code specialised the capture to the default example's length (a Python loop over
            # the tokens): capture it at the calibration's; other lengths are captured when they are run.
            gm = capture(model, example_like(kwargs["input_ids"]))
    if store is not None:
        attach(gm, store, HF_PREFIX)
    gm = run_passes(gm, passes, calibration=calibration)
    if is_hf_causal_lm(model):
        return SlicedCausalLM(gm, model.config)
    return gm


def report(model: torch.nn.Module) -> dict[str, Any]:
    """What was done to a compiled (or loaded) model, as JSON-serialisable data, from its plan.

    ``states``: every residual state with the module that writes it, its width before and after, where
    its ``Q`` came from (and, with PCA, the variance kept); ``inner``: after ``shrink_mlp`` or
    ``slice(budget=…)``, every MLP's down projection with its inner width before and after (``mlps``),
    the fraction of its output's energy on the calibration tokens the refit lost (``refit_error``),
    with ``schedule="sensitivity"`` the held-out losses the widths were chosen from (``planned``: each
    MLP's at its width, the stream's, the parameter count), its module, and the candidates skipped with
    the reason; ``values``: after ``shrink_values``, every value projection with its head width before
    and after, its module and the attentions skipped with the reason; ``query_key``: after
    ``shrink_query_key``, every query projection with its head width before and after (``heads``), its
    module and the attentions skipped with the reason (``channels``: the plan keeps which channels);
    ``skipped``: regions left alone and why; ``heal``: after ``fxslice.heal``, its steps, best step,
    seconds, tokens/s and peak memory (GiB) next to its estimate; ``parameters``: counts before and after,
    every parameter counted once, inserted skip / bridge matrices included.
    """
    gm = graph_module(model)
    plan = plan_of(gm)
    states = []
    for s in plan.states:
        entry = {"state": s.state, "module": s.module, "width_before": s.width,
                 "width_after": s.width if s.kept is None else s.kept, "q": s.q, "sources": s.sources, "sinks": s.sinks}
        entry.update({k: v for k, v in (("kept_variance", s.kept_variance), ("norm_gain", s.norm_gain)) if v is not None})
        states.append(entry)
    rotation = None
    if plan.rotation is not None:
        q = sorted({s.q for s in plan.states if s.q is not None})
        rotation = {"mode": plan.rotation, "q": q[0] if len(q) == 1 else q, **plan.details.get("rotate", {}),
                    **{k: v for k, v in plan.timings.items() if k in ("rotate_s", "eigh_s")}}
    before, after = plan.parameters_before, unique_parameters(gm)
    return {
        "model": plan.model_class,
        "passes": [{"name": p.name, **p.kwargs} for p in plan.passes],
        "fuse_norm": plan.details.get("fuse_norm"),
        "rotation": rotation,
        "states": states,
        "inner": plan.details.get("shrink_mlp"),
        "values": plan.details.get("shrink_values"),
        "query_key": _query_key(plan.details.get("shrink_query_key")),
        "skipped": [{"pass": s.pass_name, **{k: v for k, v in dataclasses.asdict(s).items() if k != "pass_name"}}
                    for s in plan.skipped],
        "heal": {k.removeprefix("heal_"): v for k, v in plan.timings.items() if k.startswith("heal_")} or None,
        "parameters": {"before": before, "after": after, "ratio": (after / before) if before else None},
    }


def _query_key(details: dict | None) -> dict | None:
    if details is None:
        return None
    heads = [[name, width, len(kept[0])] for name, width, kept in details["channels"]]
    return {"heads": heads, **{k: v for k, v in details.items() if k != "channels"}}
