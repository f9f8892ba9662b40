"""Shared test helpers: compile a TinyLM and compare it with the original in float64."""

from __future__ import annotations

import warnings

import torch

import fxslice
from conftest import relative_error
from strategies import Arch, TinyLM, example_ids


def tiny(arch: Arch, dtype: torch.dtype = torch.float64) -> TinyLM:
    return TinyLM(arch).to(dtype).eval()


def compile_and_compare(arch: Arch, passes, dtype: torch.dtype = torch.float64):
    """Compile a TinyLM of ``arch``; return (compiled, relative logit error at a new shape)."""
    model = tiny(arch, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxslice.compile(model, passes, example_inputs=(example_ids(arch, 2, 7),))
    ids = example_ids(arch, 3, 5, seed=3)
    with torch.no_grad():
        return compiled, relative_error(compiled(ids), model(ids))


def ops(gm: torch.fx.GraphModule, packet) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet]
