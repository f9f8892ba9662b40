"""fxslice's passes: each is a ``GraphModule -> PassResult`` callable (runs under torch's PassManager).

``fuse_norm``, ``rotate`` and ``slice(ratio)`` are ready-made; their classes ``FuseNorm``, ``Rotate`` and
``Slice`` take options (``Rotate(shared=True)``, ``Slice(widths=…)``). ``REGISTRY`` maps pass names to
classes, as used by saved recipes and the command line.
"""

from .base import FxslicePass, PassResult, run_passes
from .fuse_norm import FuseNorm, fuse_norm
from .rotate import RandomRotation, Rotate, RotationSource, random_orthogonal, rotate
from .slice import Slice, slice  # noqa: A004 - `slice(0.25)` is the documented spelling

REGISTRY: dict[str, type[FxslicePass]] = {cls.name: cls for cls in (FuseNorm, Rotate, Slice)}

__all__ = [
    "REGISTRY",
    "FuseNorm",
    "FxslicePass",
    "PassResult",
    "RandomRotation",
    "Rotate",
    "RotationSource",
    "Slice",
    "fuse_norm",
    "random_orthogonal",
    "rotate",
    "run_passes",
    "slice",
]
