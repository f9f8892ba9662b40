"""Replay a saved plan on a freshly captured graph: the same structure, no calibration, no rotations.

Each ``PassSpec`` of the plan is built again through ``fxslice.passes.REGISTRY`` with its saved options
and run inside ``replaying(gm, plan)``: ``rotate`` then keeps the weights (inserting the same skip
matrices) and ``slice`` cuts every state to the width the plan records. The graph comes out with the
saved graph's code and tensor shapes (``io.fingerprint`` checks it); the weights are assigned afterwards
(``fxslice.load``), or shared with the compressed model (the KV-cache decoder).
"""

from __future__ import annotations

import torch.fx as fx

from .errors import UnsupportedGraphError
from .passes import REGISTRY, run_passes
from .passes.base import replaying
from .plan import Plan, set_plan

__all__ = ["replay"]


def replay(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Rebuild on ``gm`` (a fresh capture of the original architecture) the structure ``plan`` records;
    ``gm`` then carries ``plan`` itself."""
    unknown = [spec.name for spec in plan.passes if spec.name not in REGISTRY]
    if unknown:
        raise UnsupportedGraphError(f"the plan names passes this fxslice does not have: {unknown}; known: "
                                    f"{sorted(REGISTRY)}")
    passes = [REGISTRY[spec.name](**spec.kwargs) for spec in plan.passes]
    with replaying(gm, plan):
        run_passes(gm, passes)
    set_plan(gm, plan)
    return gm
