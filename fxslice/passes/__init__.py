"""fxslice's passes: each is a ``GraphModule -> PassResult`` callable (runs under torch's PassManager).

``fuse_norm``, ``rotate`` and ``slice(ratio)`` are ready-made; their classes ``FuseNorm``, ``Rotate`` and
``Slice`` take options (``Rotate(shared=True)``, ``Slice(widths=…)``). ``REGISTRY`` maps pass names to
classes: a saved plan is replayed through it (``fxslice.replay``). ``run_passes(gm, passes,
calibration=batches)`` runs a pipeline; ``calibrated(gm, batches, passes)`` gives torch's PassManager
the same context.
"""

from .base import FxslicePass, PassResult, calibrated, run_passes
from .fuse_norm import FuseNorm, fuse_norm
from .rotate import RandomRotation, Rotate, RotationSource, random_orthogonal, rotate
from .shrink_mlp import ShrinkMLP, shrink_mlp
from .shrink_query_key import ShrinkQueryKey, shrink_query_key
from .shrink_values import ShrinkValues, shrink_values
from .slice import Slice, slice  # noqa: A004 - `slice(0.25)` is the documented spelling

REGISTRY: dict[str, type[FxslicePass]] = {cls.name: cls for cls in (FuseNorm, Rotate, Slice, ShrinkMLP, ShrinkValues,
                                                               ShrinkQueryKey)}

__all__ = [
    "REGISTRY",
    "FuseNorm",
    "FxslicePass",
    "PassResult",
    "RandomRotation",
    "Rotate",
    "RotationSource",
    "ShrinkMLP",
    "ShrinkQueryKey",
    "ShrinkValues",
    "Slice",
    "calibrated",
    "fuse_norm",
    "random_orthogonal",
    "rotate",
    "run_passes",
    "shrink_mlp",
    "shrink_query_key",
    "shrink_values",
    "slice",
]
