"""Data-parallel calibration with ``torch.distributed``.

When a process group is initialised (``torchrun --nproc-per-node N``, or ``init_process_group`` in the
user's script), each process runs its own share of the calibration batches through every segment of
the sweep. Everything a pass computes from the activations is a sum over tokens (``Σ xᵀx``, ``Σ x``,
token counts, kept lengths), so the shares' sums are added across processes (in float64) before they are
used; every eigendecomposition and channel choice is computed once, on rank 0, and broadcast, so every
process folds the same ``Q`` into the same weights and the sweep goes on identically everywhere. Only
rank 0 writes (``fxslice.save``; the others wait for it). A check that fails in one process fails in
all (``agreed``), so none is left waiting in a collective. Without a process group (or with one
process) every function here is the identity.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, TypeVar

import optree
import torch
import torch.distributed as dist

from .errors import CalibrationError

__all__ = ["agreed", "check_shares", "from_rank0", "joined", "on_rank0", "rank", "share", "total", "world_size"]

T = TypeVar("T")


@contextlib.contextmanager
def joined():
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) and with no process group yet: a gloo
    process group for the block (CPU calibration), destroyed after it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def total(value: T) -> T:
    """``value`` (a tensor, a number, or a list of them) summed over every process."""
    if world_size() == 1:
        return value
    leaves, spec = optree.tree_flatten(value)
    device = _device()
    out = []
    for leaf in leaves:
        tensor = torch.as_tensor(leaf, dtype=torch.float64 if isinstance(leaf, float) else None)
        moved = tensor.to(device, copy=True)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        out.append(moved.to(tensor.device) if isinstance(leaf, torch.Tensor) else moved.item())
    return optree.tree_unflatten(spec, out)


def from_rank0(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only (a tensor or a tuple of tensors); every process gets its result."""
    if world_size() == 1:
        return compute()
    result = compute() if rank() == 0 else None
    layout = [None if result is None else optree.tree_map(lambda t: (tuple(t.shape), t.dtype), result)]
    dist.broadcast_object_list(layout, src=0)  # shapes and dtypes first, so the others can receive
    shapes, spec = optree.tree_flatten(layout[0], is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                                       and isinstance(x[1], torch.dtype))
    mine = optree.tree_leaves(result) if result is not None else [None] * len(shapes)
    device, out = _device(), []
    for (shape, dtype), value in zip(shapes, mine):
        buffer = value.to(device, copy=True) if value is not None else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(buffer, src=0)
        out.append(value if value is not None else buffer)
    return optree.tree_unflatten(spec, out)


def on_rank0(action: Callable[[], T], what: str) -> T | None:
    """``action()`` on rank 0 only (writing files); the others wait for it and raise if it failed.
    Rank 0 gets the result, the others ``None``."""
    if world_size() == 1:
        return action()
    outcome: list = [None]
    result = None
    if rank() == 0:
        try:
            result = action()
        except BaseException as error:
            outcome[0] = f"{type(error).__name__}: {error}"
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 failed to {what}: {outcome[0]}")
    return result


def agreed(check: Callable[[], None]) -> None:
    """``check()`` in every process; if it raised in any, it raises in all (its own error where it failed,
    a ``CalibrationError`` naming the ranks elsewhere), so no process goes on to wait for the others in
    a collective they will never reach."""
    if world_size() == 1:
        return check()
    problem = None
    try:
        check()
    except Exception as error:  # re-raised below, after every process has said how its check went
        problem = error
    failed: list = [None] * world_size()
    dist.all_gather_object(failed, problem is not None)
    if problem is not None:
        raise problem
    if any(failed):
        ranks = [i for i, f in enumerate(failed) if f]
        raise CalibrationError(f"the check failed in process(es) {ranks} (see their error); nothing was changed")


def share(batches: list[Any]) -> list[Any]:
    """This process's share of ``batches``: every ``world_size()``-th one, starting at ``rank()``."""
    return batches[rank()::world_size()]


def check_shares(batches: list[Any]) -> None:
    """Every process must hold at least one batch: each takes part in every sum of the sweep, and a
    mistake in the sharding is better caught before the sweep starts than as a hang inside it."""
    if world_size() == 1:
        return
    counts: list = [None] * world_size()
    dist.all_gather_object(counts, len(batches))
    if min(counts) == 0:
        raise CalibrationError(f"under torch.distributed every process needs calibration batches; batches per rank: "
                               f"{counts}: give at least {world_size()} batches (one per process)")
