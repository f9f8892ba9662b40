"""Read-only analysis of captured graphs: op roles, norm patterns and residual-stream regions.

Nothing here changes a graph; the passes in ``fxslice.passes`` act on what these functions return.
"""

from .norms import FUSED_NORM, FusedNorm, Norm, find_norms
from .ops import ParamAxis, ShapeLiteral, WeightUse, register_stream_op, register_weight_op, stream_step, weight_use
from .regions import Blocker, Region, Sink, Source, State, bind_parameters, find_regions, written_by

__all__ = [
    "FUSED_NORM",
    "Blocker",
    "FusedNorm",
    "Norm",
    "ParamAxis",
    "Region",
    "ShapeLiteral",
    "Sink",
    "Source",
    "State",
    "WeightUse",
    "bind_parameters",
    "find_norms",
    "find_regions",
    "register_stream_op",
    "register_weight_op",
    "stream_step",
    "weight_use",
    "written_by",
]
