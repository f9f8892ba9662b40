"""What a job will need in memory, known before it starts, and whether the machine has it.

The graph is run once on fake tensors (``FakeTensorMode``: shapes and dtypes, no storage) with a real
batch's shapes, which gives the bytes of every value it computes. From them:

- ``cached``: the calibration sweep keeps, for every batch, the values that cross from one residual
  state's segment into the next (the stream, masks, position tables): the largest such crossing over the
  states' anchors, times the number of batches, scaled by each batch's tokens.
- ``batch``: one batch at a time runs through a segment: the most bytes alive at once while the graph
  runs one batch (the largest batch).
- ``statistics``: float64 work for the widest state or MLP: ``Σ xᵀx``, its eigendecomposition and
  copies (a few ``d × d`` float64 matrices).
- ``weights``: the rewritten copy of the weights the passes build next to the model's own (for a
  streamed model, the store's budget: ``fxslice.streaming``).
- ``backward`` (only for passes that back-propagate, before the sweep): every value one sequence
  computes (views left out) is kept for the backward pass; counted beyond what the sweep itself needs,
  since the two never run at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import optree
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, ShapeEnv

from .errors import CalibrationError
from .graph import computes_sizes_from_values, fake_weights, flat_inputs, graph_device

__all__ = ["GiB", "MAX_MEMORY_ENV", "available_bytes", "calibration_estimate", "check_fits", "describe", "fits",
           "value_bytes"]

GiB = 1024**3
MAX_MEMORY_ENV = "FXSLICE_MAX_MEMORY_GIB"
"""When set, the memory a job may use (GiB) instead of what the machine reports available."""


def value_bytes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[fx.Node, int]:
    """Bytes of the floating tensors every node computes for ``gm(*args, **kwargs)``, on fake tensors
    (nothing is allocated, nothing is computed)."""
    sizes: dict[fx.Node, int] = {}

    class _Measure(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op not in ("get_attr", "output"):
                sizes[node] = sum(_known_numel(leaf) * leaf.element_size() for leaf in optree.tree_leaves(result)
                                  if isinstance(leaf, torch.Tensor) and leaf.is_floating_point())
            return result

    # A throwaway environment for sizes computed from values: the capture's own is left as it was.
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv() if computes_sizes_from_values(gm) else None)
    device = graph_device(gm)  # the batch may wait on the CPU for a graph on a GPU: its fakes go where it runs
    inputs = [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x
              for x in flat_inputs(gm, args, kwargs)]
    with fake_weights(gm, mode), mode:
        _Measure(gm).run(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs))
    return sizes


def _known_numel(tensor: torch.Tensor) -> int:
    """Elements of ``tensor``; 0 where a size is computed from values (the rows routed to one expert),
    which no fake run knows: such values are left out of the estimate."""
    try:
        return int(tensor.numel())
    except GuardOnDataDependentSymNode:
        return 0


def _alive(gm: fx.GraphModule, sizes: dict[fx.Node, int]) -> tuple[dict[fx.Node, int], int]:
    """For every node, the bytes of the values computed at or before it that are read after it; and the
    most bytes alive at once while the graph runs."""
    order = [n for n in gm.graph.nodes if n in sizes]
    position = {n: i for i, n in enumerate(order)}
    last = {n: max((position.get(u, len(order)) for u in n.users), default=position[n]) for n in order}
    ends: dict[int, int] = {}
    crossing, alive, peak = {}, 0, 0
    for i, node in enumerate(order):
        alive += sizes[node]
        peak = max(peak, alive)
        ends[last[node]] = ends.get(last[node], 0) + sizes[node]
        alive -= ends.pop(i, 0)
        crossing[node] = alive
    return crossing, peak


def calibration_estimate(gm: fx.GraphModule, batches: list, backward: bool = False) -> dict[str, int]:
    """Bytes a calibration sweep of ``gm`` over ``batches`` needs, by kind (see the module docstring);
    ``backward``: a pass back-propagates a sequence at a time."""
    from .analysis.regions import find_regions
    from .calibrate import batch_tokens
    from .graph import STREAMED, tensor_meta, tensor_targets

    largest = max(batches, key=batch_tokens)
    sizes = value_bytes(gm, *largest)
    crossing, peak = _alive(gm, sizes)
    try:
        states = [s for r in find_regions(gm) for s in r.states]
    except Exception:  # a graph the analysis cannot read: every node may end a segment
        states = []
    anchors = [s.anchor for s in states if s.anchor in crossing]
    boundary = max((crossing[a] for a in anchors), default=max(crossing.values(), default=0))
    cached = sum(boundary * batch_tokens(b) // batch_tokens(largest) for b in batches)
    widths = [s.width for s in states]
    for target in tensor_targets(gm):
        tensor = tensor_meta(gm, target)
        if tensor.dim() == 2:
            widths.append(min(tensor.shape))  # an MLP's inner width is the smaller side of its weights
    widest = max(widths, default=0)
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                                                          (tensor_meta(gm, x) for x in tensor_targets(gm))}.values())
    store = gm.meta.get(STREAMED)
    if store is not None:  # streamed: at most the store's budget of weights is in memory
        weights = min(weights, store.budget)
    estimate = {"weights": weights, "cached": cached, "batch": peak, "statistics": 6 * widest * widest * 8}
    if backward:
        leaves = [x for x in optree.tree_leaves(largest) if isinstance(x, torch.Tensor) and x.dim() > 1]
        rows = leaves[0].shape[0] if leaves else 1
        sequence = sum(v for n, v in sizes.items() if n.op == "call_function" and not _is_view(n)) // rows
        estimate["backward"] = max(0, sequence - cached - peak - estimate["statistics"])
    return estimate


def _is_view(node: fx.Node) -> bool:
    """Whether the op returns a view of its input (no bytes of its own)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a job may still take: ``FXSLICE_MAX_MEMORY_GIB`` when set; on a GPU what it reports free;
    on Linux the smaller of the kernel's available memory and what the process's cgroup still allows;
    ``None`` where none of these can be read."""
    limit = os.environ.get(MAX_MEMORY_ENV)
    if limit:
        try:
            return int(float(limit) * GiB)
        except ValueError:
            raise ValueError(f"{MAX_MEMORY_ENV}={limit!r} is not a number of GiB") from None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if not sys.platform.startswith("linux"):
        return None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            found.append(int(cap) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def describe(estimate: dict[str, int]) -> str:
    return f"{sum(estimate.values()) / GiB:.2f} GiB (" + ", ".join(f"{k} {v / GiB:.2f}" for k, v in estimate.items()) + ")"


def fits(estimate: dict[str, int], device: torch.device | str = "cpu") -> bool:
    """Whether the bytes of ``estimate`` (beyond what the process holds now) are at most ``available_bytes``
    (True where that cannot be read)."""
    available = available_bytes(device)
    return available is None or sum(estimate.values()) <= available


def check_fits(estimate: dict[str, int], what: str, remedy: str, device: torch.device | str = "cpu") -> None:
    """Refuse (``CalibrationError``) when the bytes of ``estimate`` (beyond what the process holds now) are
    more than ``available_bytes``; the message names the estimate, what is available and ``remedy``."""
    available = available_bytes(device)  # read once: the message names the figure the check compared with
    if available is not None and sum(estimate.values()) > available:
        raise CalibrationError(f"{what} needs an estimated {describe(estimate)} more than this process holds, and "
                               f"{available / GiB:.2f} GiB is available: {remedy}")
