"""fxslice: SliceGPT for any transformer, as compiler passes over its torch.fx graph.

    sliced = fxslice.compile(model, passes=[fuse_norm, rotate, slice(0.25)], calibration=batches)
    fxslice.report(sliced)        # what was rotated, sliced and skipped, and parameter counts
"""

from .api import compile, report  # noqa: A004
from .capture import capture
from .errors import CalibrationError, CaptureError, PassOrderError, UnsupportedGraphError
from .heal import heal
from .io import load, save
from .portable import export
from .passes import (FuseNorm, Rotate, ShrinkMLP, ShrinkQueryKey, ShrinkValues, Slice, fuse_norm,  # noqa: A004
                     rotate, shrink_mlp, shrink_query_key, shrink_values, slice)

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CaptureError",
    "FuseNorm",
    "PassOrderError",
    "Rotate",
    "ShrinkMLP",
    "ShrinkQueryKey",
    "ShrinkValues",
    "Slice",
    "UnsupportedGraphError",
    "capture",
    "compile",
    "export",
    "fuse_norm",
    "heal",
    "load",
    "report",
    "rotate",
    "save",
    "shrink_mlp",
    "shrink_query_key",
    "shrink_values",
    "slice",
]
