"""Sequential PCA calibration: one sweep of the graph over all calibration batches.

The graph is interpreted segment by segment, where a segment ends at the next residual state's anchor
(the first node holding the state's complete value). Within a segment each batch runs to the end before
the next starts, so only values that cross into later segments (the stream itself, masks, position
tables) are kept for all batches; intermediate activations live for one batch at a time. At each anchor
``H = Σ xᵀx`` over real tokens (the attention mask's ones) is accumulated in float64, ``eigh`` gives the
rotation (eigenvectors by descending eigenvalue), ``apply`` folds it into the weights and slices, and the
cached values of the state become ``x Q[:, :k]`` before the sweep goes on. Later states therefore see the
already sliced model, as in SliceGPT, and the whole model is run once.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optree
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from .analysis.regions import SKIP_EDGE, State, output_heads
from .distributed import agreed, check_shares, from_rank0, rank, total, world_size
from .errors import CalibrationError
from .capture import refusal
from .graph import flat_inputs, get_tensor, graph_device, logits_of, mutates, val
from .rewrite import scale_normed_sinks

__all__ = ["RESCALE_EXPONENT", "SENSITIVITY_TOKENS", "SPECTRUM_TOKENS", "Batch", "Batches", "InnerStatistics",
           "PCARotation", "batch_tokens", "check_calibration", "first_tokens", "gram", "lost_fraction",
           "FeatureSquares", "RotatedSquares", "backward_statistics", "first_sequences", "fold_rotations",
           "output_sensitivity", "pca", "projected_loss", "sweep_inner"]

RESCALE_EXPONENT = 8.0
"""After a state is sliced, the sinks of the norms reading it are multiplied by ``mean(r)^-8``, where
``r = ‖x Q_k‖ / ‖x‖`` per calibration token (``slice(..., rescale=True)``). The exponent was chosen on
validation text (docs/design.md, "Rescaling")."""

SPECTRUM_TOKENS = 4096
"""``slice(..., schedule="spectrum")`` plans from the spectra of the unsliced model measured on the first
4096 calibration tokens (``PCARotation.losses``): a cheap pre-pass. Fewer tokens plan worse, because a
state's covariance is bounded by the distinct tokens it has seen (docs/design.md, "Schedules")."""

Batch = tuple[tuple, dict]
"""One calibration batch as positional and keyword model inputs."""


class Batches(tuple):
    """Calibration batches ``check_calibration`` has validated (checking them again returns them as they are).

    ``spill``: the sweeps keep their cached values on disk (``fxslice.passes.calibrated`` sets it when
    they would not fit in memory)."""

    spill = False

    def on_disk(self) -> Batches:
        """The same batches, with the sweeps' cached values kept on disk."""
        spilled = Batches(self)
        spilled.spill = True
        return spilled


def _as_batch(item: Any, index: int) -> Batch:
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(f"calibration batch {index} is a {type(item).__name__}; expected a dict of model "
                           "inputs (e.g. {'input_ids': ..., 'attention_mask': ...}), a tuple or a tensor")


def _iterate(calibration: Any) -> list:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = ()  # type: ignore[assignment]
    if isinstance(calibration, Dataset):
        if "input_ids" not in calibration.column_names:
            raise CalibrationError(f"the calibration Dataset has columns {calibration.column_names}; it must be "
                                   "tokenized, with an 'input_ids' column")
        columns = [c for c in ("input_ids", "attention_mask") if c in calibration.column_names]
        return list(calibration.select_columns(columns).with_format("torch").iter(batch_size=8))
    if isinstance(calibration, (Mapping, torch.Tensor)):
        return [calibration]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be batches of model inputs (a list of dicts, a DataLoader or a "
                               f"tokenized datasets.Dataset); got {type(calibration).__name__}. For text, use "
                               "fxslice.data.calibration_batches(tokenizer, path)")
    return list(calibration)


def check_calibration(calibration: Any, model: torch.nn.Module | None = None, hf: bool = False) -> Batches:
    """Materialise and validate calibration batches before any weight changes.

    Under ``torch.distributed`` (see ``fxslice.distributed``) each process passes its own share.
    Accepts an iterable of input dicts / tuples / tensors, a ``torch.utils.data.DataLoader`` or a
    tokenized ``datasets.Dataset``. Rejects empty data, non-finite values, keys the model does not take,
    ``input_ids`` that are not non-empty 2-D integer tensors with a matching ``attention_mask``, and (for a
    causal LM) sequences longer than the model's positions.
    """
    if isinstance(calibration, Batches):
        return calibration
    batches = [_as_batch(item, i) for i, item in enumerate(_iterate(calibration))]
    check_shares(batches)  # under torch.distributed, ``calibration`` is this process's share
    agreed(lambda: _check_batches(batches, model, hf))
    return Batches(batches)


def _check_batches(batches: list[Batch], model: torch.nn.Module | None, hf: bool) -> None:
    if not batches:
        raise CalibrationError("calibration data is empty")
    for index, (args, kwargs) in enumerate(batches):
        if hf:
            unknown = sorted(set(kwargs) - {"input_ids", "attention_mask"})
            if args or unknown or "input_ids" not in kwargs:
                raise CalibrationError(f"calibration batch {index} has keys {sorted(kwargs)}; a causal LM is "
                                       "calibrated with 'input_ids' and optionally 'attention_mask'")
        elif model is not None:
            try:
                inspect.signature(model.forward).bind(*args, **kwargs)
            except TypeError as error:
                raise CalibrationError(f"calibration batch {index} does not match {type(model).__name__}.forward"
                                       f"{inspect.signature(model.forward)}: {error}") from None
        for path, leaf in zip(*optree.tree_flatten_with_path((args, kwargs), none_is_leaf=False)[:2]):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all():
                raise CalibrationError(f"calibration batch {index} input {path} contains NaN or infinite values")
        ids = kwargs.get("input_ids")
        if ids is not None:
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.numel() == 0:
                raise CalibrationError(f"calibration batch {index}: input_ids must be a non-empty 2-D integer "
                                       f"tensor [batch, tokens]; got {getattr(ids, 'shape', type(ids).__name__)}")
            mask = kwargs.get("attention_mask")
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
                raise CalibrationError(f"calibration batch {index}: attention_mask shape "
                                       f"{tuple(getattr(mask, 'shape', ()))} does not match input_ids {tuple(ids.shape)}")
            if hf and mask is None:
                kwargs["attention_mask"] = torch.ones_like(ids)
            positions = _positions(model) if hf else None
            if positions is not None and ids.shape[1] > positions:
                raise CalibrationError(f"calibration batch {index} has {ids.shape[1]} tokens per sequence; "
                                       f"{type(model).__name__} has {positions} positions (max_position_embeddings): "
                                       f"use sequences of at most {positions} tokens (CLI: --seq-len)")
        why = refusal(model, args, kwargs) if isinstance(model, fx.GraphModule) else None
        if why is not None:
            shapes = [tuple(x.shape) for x in optree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            raise CalibrationError(
                f"calibration batch {index} (shapes {shapes}) is refused by the captured graph: the model's code "
                f"specialised the capture to its example's sizes ({why}); capture it with example_inputs shaped "
                "like the calibration batches (fxslice.compile does so itself for a causal LM) and give every "
                "batch those sizes")


def _positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def batch_tokens(batch: Batch) -> int:
    """Sequences × tokens of a batch: the shape of its first input with at least two dims (1 without one)."""
    leaves = [x for x in optree.tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim() >= 2]
    return int(leaves[0].shape[0] * leaves[0].shape[1]) if leaves else 1


def first_tokens(batches: list[Batch], tokens: int) -> list[Batch]:
    """The first sequences of ``batches`` that hold at least ``tokens`` tokens: whole batches, the last one
    cut to the rows needed (every tensor input whose leading size is the batch's is cut)."""
    taken, count = [], 0
    for batch in batches:
        leaves = [x for x in optree.tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim() > 0]
        if not leaves:
            return taken + [batch]
        rows = leaves[0].shape[0]
        per_row = leaves[0].shape[1] if leaves[0].dim() > 1 else 1
        needed = -(-(tokens - count) // per_row)  # ceil
        if needed < rows:
            batch = _rows(batch, rows, slice(0, needed))
        taken.append(batch)
        count += min(needed, rows) * per_row
        if count >= tokens:
            break
    return taken


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``xᵀx`` for ``x`` of shape ``[n, d]``, one block row on and above the diagonal at a time, mirrored
    below it since ``(xᵀx)ᵀ = xᵀx``: ``(blocks + 1) / (2 blocks)`` of the flops of ``x.T @ x`` (5/8 for
    4 blocks), the same sums."""
    d = x.shape[-1]
    edges = [d * i // blocks for i in range(blocks + 1)]
    h = x.new_empty(d, d)
    for start, end in zip(edges, edges[1:]):
        row = x[:, start:end].T @ x[:, start:]  # the block row [start:end, start:]
        h[start:end, start:] = row
        h[end:, start:end] = row[:, end - start :].T
    return h


def pca(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and the orthogonal matrix of eigenvectors of a covariance ``H``, each
    with a fixed sign (positive along a fixed random direction)."""
    values, vectors = torch.linalg.eigh(h)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    # Each eigenvector's sign is arbitrary (q and −q both are one). Fix it, qᵀr > 0 for a fixed random r,
    # so that H summed in another order (another process count) gives the same Q, not one with flipped
    # columns (the model would compute the same, but its weights would differ). A random r, not the
    # largest entry: a dense eigenvector often has two entries of nearly equal magnitude, and a tiny
    # change in H then flips which is largest; |qᵀr| is rarely that small.
    r = torch.randn(vectors.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    side = r.to(vectors.device, vectors.dtype) @ vectors
    return values, vectors * torch.where(side < 0, -1.0, 1.0).to(vectors.dtype)


class _Timed:
    """``pca`` that adds up the time it spends (reported as ``eigh_s``)."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        try:
            return from_rank0(lambda: pca(h))  # one decomposition, the same Q in every process
        finally:
            self.seconds += time.perf_counter() - start


def _ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they read, transitively."""
    found: set = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found


def _written(node: fx.Node) -> list[fx.Node]:
    """The tensor an in-place op writes and the tensors it is a view of (its first argument, followed
    through first arguments)."""
    chain, value = [], node.args[0] if node.args else None
    while isinstance(value, fx.Node):
        chain.append(value)
        value = value.args[0] if value.args else None
    return chain


class _Sweep:
    """Runs the graph over every batch, a segment at a time, keeping only values later segments read."""

    def __init__(self, gm: fx.GraphModule, batches: list[Batch], targets: list[fx.Node],
                 identities: frozenset = frozenset()):
        self.gm = gm
        self.identities = identities  # linear nodes whose weight is the identity: x·I = x, not computed
        needed = _ancestors(targets)
        # An in-place op (``buffer[..., :k].copy_(a)`` into a ``new_empty`` buffer) has no users, yet
        # what it writes is read later: run it whenever what it writes into is needed.
        mutations = [n for n in gm.graph.nodes if mutates(n)]
        grown = True
        while grown:
            grown = False
            for node in mutations:
                if node not in needed and any(base in needed for base in _written(node)):
                    needed |= _ancestors([node])
                    grown = True
        # Values made from parameters alone (a transposed weight) are computed where read, never cached:
        # apply() replaces parameters as the sweep goes.
        self.weight_views: set[fx.Node] = set()
        for n in gm.graph.nodes:
            if (n.op == "call_function" and n not in targets and not mutates(n) and n.all_input_nodes
                    and all(a.op == "get_attr" or a in self.weight_views for a in n.all_input_nodes)):
                self.weight_views.add(n)
        self.order = [n for n in gm.graph.nodes
                      if n in needed and n.op not in ("placeholder", "get_attr") and n not in self.weight_views]
        position = {n: i for i, n in enumerate(self.order)}
        self.position = position
        self.last_use = {n: max((position.get(u, -1) for u in n.users), default=-1) for n in needed}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        device = graph_device(gm)  # batches may come on another device than the model's

        def moved(values):
            return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]

        self.envs = [dict(zip(placeholders, moved(flat_inputs(gm, args, kwargs)))) for args, kwargs in batches]
        self.masks = [None if m is None else m.to(device) for m in (kwargs.get("attention_mask") for _, kwargs in batches)]
        self.cursor = 0
        self.by_name = {n.name: n for n in needed}
        self.spill = None  # the directory cached values are kept in, when they are kept on disk
        if getattr(batches, "spill", False):
            self.spill = Path(tempfile.mkdtemp(prefix="fxslice-activations-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.spill, True)

    def _environments(self):
        """Each batch's values in turn. When they are kept on disk, a batch's cached tensors are read
        before it is handed out and written back after, so one batch's are in memory at a time."""
        for b, env in enumerate(self.envs):
            path = self.spill / f"{b}.pt" if self.spill is not None else None
            if path is not None and path.exists():
                env.update({self.by_name[k]: v for k, v in torch.load(path, weights_only=True).items()})
            yield b, env
            if path is not None:
                cached = {n.name: v for n, v in env.items() if n.op != "placeholder" and isinstance(v, torch.Tensor)}
                torch.save(cached, path)
                for name in cached:
                    del env[self.by_name[name]]

    def _value(self, node: fx.Node, env: dict):
        # Parameters are read when used, never cached: apply() replaces them as the sweep goes.
        if node.op == "get_attr":
            return get_tensor(self.gm, node.target)
        return self._run(node, env) if node in self.weight_views else env[node]

    def _run(self, node: fx.Node, env: dict):
        if node in self.identities:
            return env[node.args[0]]
        args = fx.node.map_arg(node.args, lambda n: self._value(n, env))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self._value(n, env))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"cannot interpret {node.format_node()}")

    @torch.no_grad()
    def run_until(self, target: fx.Node, observe=None) -> None:
        """Compute every node up to ``target`` for all batches; ``observe(batch, value)`` sees target."""
        end = self.position[target]
        segment = self.order[self.cursor : end + 1]
        for b, env in self._environments():
            for node in segment:
                env[node] = self._run(node, env)
                self._drop_read(node, env, (target,))
            if observe is not None:
                observe(b, env[target])
            for node in [n for n in env if n.op != "placeholder" and self.last_use.get(n, -1) <= end]:
                del env[node]
        self.cursor = end + 1

    def _drop_read(self, node: fx.Node, env: dict, observed: tuple) -> None:
        """Values ``node`` was the last to read leave ``env`` at once (but the ``observed`` ones): one batch's
        segment holds only what is still to be read, as a plain forward does (an MLP's inner values,
        attention's scores)."""
        here = self.position[node]
        for value in (*node.all_input_nodes, node):  # ``node`` itself when nothing reads it (an in-place copy)
            if (value not in observed and value.op != "placeholder" and value in env
                    and self.last_use.get(value, -1) <= here):
                del env[value]

    def start_of(self, nodes, target: fx.Node) -> int:
        """The earliest position from which ``peek(target)`` may recompute, given that ``nodes`` must be
        recomputed: also every value an in-place op on the way writes into (peek must not write twice
        into a cached value)."""
        first = min(self.position[n] for n in nodes)
        while True:
            written = [self.position[base] for node in self.order[first : self.position[target] + 1] if mutates(node)
                       for base in _written(node) if base in self.position]
            if not written or min(written) >= first:
                return first
            first = min(written)

    @torch.no_grad()
    def peek(self, target: fx.Node, observe, groups: fx.Node | None = None) -> None:
        """``observe(batch, value)`` sees ``target`` for all batches as in ``run_until``, but nothing is kept:
        the values from the cursor to ``target`` go into a scratch copy of each batch's values, dropped
        after it (``observe(batch, value, offsets)`` with the value of ``groups``)."""
        segment = self.order[self.cursor : self.position[target] + 1]
        for b, env in self._environments():
            scratch = dict(env)
            for node in segment:
                scratch[node] = self._run(node, scratch)
                self._drop_read(node, scratch, (target, groups))
            observe(b, scratch[target], *([scratch[groups]] if groups is not None else []))

    def transform(self, nodes: frozenset, matrix: torch.Tensor, anchor: fx.Node | None = None) -> float:
        """Cached values of ``nodes`` (a state, in its unrotated basis) become ``x @ matrix``.

        Returns the mean over real tokens of ``‖x @ matrix‖ / ‖x‖`` at ``anchor`` (1.0 if it is not cached).
        """
        kept, tokens = 0.0, 0
        for b, env in self._environments():
            mask = self.masks[b]
            for node in [n for n in env if n in nodes]:
                x = env[node]
                compute = torch.promote_types(x.dtype, torch.float32)
                wide = x.to(compute)
                y = wide @ matrix.to(device=x.device, dtype=compute)
                if node is anchor:
                    ratio = (y.norm(dim=-1) / wide.norm(dim=-1).clamp_min(torch.finfo(compute).tiny)).reshape(-1)
                    if mask is not None and mask.numel() == ratio.numel():
                        ratio = ratio[mask.reshape(-1).to(ratio.device).bool()]
                    kept += float(ratio.double().sum())
                    tokens += ratio.numel()
                env[node] = y.to(x.dtype)
        kept, tokens = total((kept, tokens)) if anchor is not None else (kept, tokens)
        return kept / tokens if tokens else 1.0


def _is_identity(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.shape[0] == weight.shape[1] and torch.equal(
        weight, torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device))


def _real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (tokens) of ``x`` the attention mask keeps, and each one's sequence in the batch (0 when
    ``x`` has no batch axis)."""
    rows = x.reshape(-1, x.shape[-1])
    sequence = torch.arange(x.shape[0] if x.dim() > 2 else 1, device=rows.device)
    sequence = sequence.repeat_interleave(rows.shape[0] // sequence.numel())
    # A row per token, or several (copies of the stream side by side: [batch, tokens, n, d]).
    per_token = mask is not None and (mask.numel() == rows.shape[0] or tuple(x.shape[:mask.dim()]) == tuple(mask.shape))
    if per_token and not bool(mask.all()):
        keep = mask.reshape(-1).to(rows.device).bool().repeat_interleave(rows.shape[0] // mask.numel())
        rows, sequence = rows[keep], sequence[keep]
    return rows, sequence


class _Covariance:
    """``Σ xᵀx`` over the real tokens of every batch, in float64."""

    def __init__(self, masks: list):
        self.masks = masks
        self.h: torch.Tensor | float = 0.0

    def __call__(self, batch: int, x: torch.Tensor) -> None:
        rows, _ = _real_rows(x, self.masks[batch])
        self.h = self.h + gram(rows.to(torch.float64))


class _FoldCovariances:
    """``Σ xᵀx`` and ``Σ x̂ᵀx̂`` (tokens scaled to unit length) over real tokens, in float64, for each of
    ``folds`` folds of the calibration sequences: sequence ``n`` (counted across batches) is in fold
    ``n mod folds``."""

    def __init__(self, masks: list, folds: int):
        self.masks = masks
        self.h: list = [0.0] * folds
        self.unit: list = [0.0] * folds
        self.tokens = [0] * folds
        self.sequences = 0

    def __call__(self, batch: int, x: torch.Tensor) -> None:
        rows, sequence = _real_rows(x, self.masks[batch])
        fold = (sequence + self.sequences) % len(self.h)
        self.sequences += x.shape[0] if x.dim() > 2 else 1
        rows = rows.to(torch.float64)
        unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        for i in range(len(self.h)):
            self.tokens[i] += int((fold == i).sum())
            self.h[i] = self.h[i] + gram(rows[fold == i])
            self.unit[i] = self.unit[i] + gram(unit[fold == i])


def group_of_rows(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """For each of ``rows`` rows, the group it belongs to: group ``e`` ends before row ``offsets[e]``
    (cumulative ends, as grouped matmuls take them; rows past the last end count as the last group's)."""
    ends = offsets.to(torch.long)
    return torch.searchsorted(ends, torch.arange(rows, device=ends.device), right=True).clamp_max(ends.numel() - 1)


class InnerStatistics:
    """``Σ hᵀh``, ``Σ h`` and the token count over the real tokens of every batch (float64 totals); with
    expert offsets, one of each per expert (``h``: ``[E, m, m]``, ``sum``: ``[E, m]``).

    Given ``row_weights`` (per batch, one weight ``s`` per row of the value, as ``FeatureSquares.per_row``
    records them), also the same sums with each token weighted: ``Σ s hᵀh``, ``Σ s h`` and ``Σ s``
    (``weighted``, ``weighted_sum``, ``weighted_tokens``; not for routed rows, which no token weight lines
    up with)."""

    def __init__(self, masks: list, counted: range | None = None, row_weights: Mapping[int, torch.Tensor] | None = None):
        self.masks = masks
        self.counted = counted  # the batches these sums take in (every batch when None)
        self.row_weights = row_weights
        self.h: torch.Tensor | float = 0.0
        self.sum: torch.Tensor | float = 0.0
        self.tokens = 0
        self.weighted: torch.Tensor | float = 0.0
        self.weighted_sum: torch.Tensor | float = 0.0
        self.weighted_tokens: torch.Tensor | float = 0.0

    def __call__(self, batch: int, x: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        if self.counted is not None and batch not in self.counted:
            return
        # Routed rows (one per token and chosen expert) do not line up with the attention mask: all count.
        rows, _ = _real_rows(x, self.masks[batch] if offsets is None else None)
        # One batch's sums in the activations' precision (at least float32), accumulated in float64:
        # the channel choice needs no more, and the Gram matrix of a wide inner layer is most of the work.
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        if offsets is None:
            self.h = self.h + gram(rows).to(torch.float64)
            self.sum = self.sum + rows.sum(0, dtype=torch.float64)
            if self.row_weights is not None:
                s, _ = _real_rows(self.row_weights[batch].reshape(-1, 1), self.masks[batch])
                s = s[:, 0].to(device=rows.device, dtype=rows.dtype)
                self.weighted = self.weighted + gram(rows * s.sqrt()[:, None]).to(torch.float64)  # Σ s hᵀh
                self.weighted_sum = self.weighted_sum + (s[:, None] * rows).sum(0, dtype=torch.float64)
                self.weighted_tokens = self.weighted_tokens + s.sum(dtype=torch.float64)
        else:
            group = group_of_rows(offsets, rows.shape[0])
            self.h = self.h + torch.stack([gram(rows[group == e]) for e in range(offsets.numel())]).to(torch.float64)
            self.sum = self.sum + torch.zeros(offsets.numel(), rows.shape[1], dtype=torch.float64,
                                              device=rows.device).index_add_(0, group, rows.to(torch.float64))
        self.tokens += rows.shape[0]


def sweep_inner(gm: fx.GraphModule, batches: list[Batch], inputs: list[tuple[fx.Node, fx.Node | None, tuple]],
                apply, progress: bool = True, desc: str = "fxslice: shrinking inner widths", unit: str = "mlp",
                folds: int = 1, row_weights: Sequence[Mapping[int, torch.Tensor] | None] | None = None) -> None:
    """Run the graph over ``batches``; at each ``(node, groups, ups)`` of ``inputs`` (in graph order)
    hand the node's ``InnerStatistics`` (per group of rows when ``groups`` holds expert offsets) to
    ``apply(index, statistics)``, which rewrites the weights: the ``ups`` nodes (the linears that make
    ``node``) keep the chosen channels. Later statistics see the model as already shrunk (the same
    sequential scheme as the residual sweep). With ``folds = f > 1``, ``apply(index, *statistics)`` gets
    ``f`` of them, fold ``i`` summing the batches ``i, i + f, i + 2f, …`` (for fits scored on held-out data).
    ``row_weights[index]``, where given, weights each token of that input's statistics too (``InnerStatistics``).

    Only values before the ``ups`` are cached while the statistics are gathered: the ``ups`` to ``node``
    run once into scratch for the statistics and once more, from the shrunk weights, within the next
    segment, so an MLP's inner values are never held for every batch (only the stream crosses from one
    segment into the next)."""
    sweep = _Sweep(gm, batches, [node for node, _, _ in inputs])
    for index, (node, groups, ups) in enumerate(tqdm(inputs, desc=desc, disable=not progress or rank() != 0, unit=unit)):
        first = sweep.start_of(ups, node)
        if first > sweep.cursor:
            sweep.run_until(sweep.order[first - 1])
        weights = row_weights[index] if row_weights is not None else None
        parts = [InnerStatistics(sweep.masks, None if folds == 1 else range(i, len(batches), folds), weights)
                 for i in range(folds)]
        sweep.peek(node, lambda *seen: [part(*seen) for part in parts], groups)
        for part in parts:
            part.h, part.sum, part.tokens = total((part.h, part.sum, part.tokens))
            if weights is not None:
                part.weighted, part.weighted_sum, part.weighted_tokens = total(
                    (part.weighted, part.weighted_sum, part.weighted_tokens))
        apply(index, *parts)
        # Nothing runs on to ``node``: the next MLP's ``run_until`` computes these ups again from the
        # shrunk weights, a batch at a time, so no inner value is cached for every batch at any width.


SENSITIVITY_TOKENS = 4096
"""Calibration tokens ``output_sensitivity`` back-propagates through (a sequence at a time)."""


def output_sensitivity(gm: fx.GraphModule, batches: list[Batch], nodes: list[fx.Node],
                       tokens: int = SENSITIVITY_TOKENS, progress: bool = True) -> list[torch.Tensor]:
    """For each of ``nodes``: per feature ``j`` (the value's last axis), the mean over every other axis of
    ``(∂L/∂y_j)²``, ``L`` the next-token cross-entropy summed over a sequence's real tokens (float64, on
    the CPU). That is the diagonal of the empirical Fisher, averaged over tokens: an error ``e`` added to
    ``y`` raises the loss by about ``Σ_j F_j e_j²``, so errors made at different places of the model, and
    in different features, are counted at what they cost downstream.

    One backward pass per sequence over the first ``tokens`` calibration tokens (``backward_statistics``)."""
    squares = [FeatureSquares(n) for n in nodes]
    backward_statistics(gm, first_sequences(batches, tokens), list(zip(nodes, squares)), progress)
    return [s.mean() for s in squares]


class FeatureSquares:
    """``output_sensitivity``'s accumulator: per feature, ``Σ (∂L/∂y_j)²`` over the rows, and the rows;
    per sequence, each row's ``‖∂L/∂y‖²`` (``per_row``, on the CPU)."""

    def __init__(self, node: fx.Node):
        # Zeros of the value's width where the graph records it: every process then sums tensors of one shape.
        value = val(node)
        known = isinstance(value, torch.Tensor) and value.dim() and isinstance(value.shape[-1], int)
        self.squares: torch.Tensor | float = torch.zeros(value.shape[-1], dtype=torch.float64) if known else 0.0
        self.rows = 0
        self.per_row: dict[int, torch.Tensor] = {}

    def forward(self, sequence: int, value: torch.Tensor, real: torch.Tensor) -> None:
        pass

    def backward(self, sequence: int, grad: torch.Tensor) -> None:
        squared = grad.detach().to(torch.float64).reshape(-1, grad.shape[-1]).square()
        self.squares = self.squares + squared.sum(0).cpu()
        self.rows += squared.shape[0]
        self.per_row[sequence] = squared.sum(1).cpu()

    def mean(self) -> torch.Tensor:
        squares, rows = total((self.squares, self.rows))
        return torch.as_tensor(squares, dtype=torch.float64) / rows if rows else torch.zeros(())


class RotatedSquares:
    """For a value ``y`` written into a residual stream: per principal direction ``q_j`` of the stream,
    ``Σ_t (∂L/∂y_t · q_j)² (y_t · q_j)²`` over the real tokens of every sequence, each fold of sequences
    seen in its own basis ``bases[f]`` (fitted on the other folds: ``fold_rotations``).

    ``losses()``: that sum per direction, the rise of the summed loss when the stream loses ``q_j``'s share
    of this write, in the same first-order terms as an MLP's refit error (each token's error counted at
    its own gradient); held out, since no fold is seen in a basis fitted on it. A sequence's value is
    held from its forward pass until its gradient arrives."""

    def __init__(self, bases: list[torch.Tensor]):
        self.bases = bases
        self.squares = torch.zeros(bases[0].shape[1], dtype=torch.float64)
        self.pending: tuple = (None, None, None)

    def _in_basis(self, sequence: int, x: torch.Tensor) -> torch.Tensor:
        basis = self.bases[sequence % len(self.bases)]
        return x.detach().reshape(-1, x.shape[-1]).to(torch.float64) @ basis.to(x.device)

    def forward(self, sequence: int, value: torch.Tensor, real: torch.Tensor) -> None:
        self.pending = (sequence, value.detach(), real)

    def backward(self, sequence: int, grad: torch.Tensor) -> None:
        seen, value, real = self.pending
        self.pending = (None, None, None)
        if seen != sequence:
            return
        products = self._in_basis(sequence, grad).square() * self._in_basis(sequence, value).square()
        if value.shape[:-1] == real.shape:
            products = products[real.reshape(-1).to(products.device).bool()]
        self.squares += products.sum(0).cpu()

    def losses(self) -> torch.Tensor:
        return total(self.squares)


def backward_statistics(gm: fx.GraphModule, sequences: list[Batch], watched: list[tuple[fx.Node, Any]],
                        progress: bool = True) -> float:
    """Run the graph forward and backward on each of ``sequences`` (one batch each), the weights frozen,
    ``L`` the next-token cross-entropy summed over real tokens. Each ``(node, watcher)`` sees the node's
    value (``watcher.forward(sequence, value, real)``, ``real`` the mask of real tokens) and the
    gradient of ``L`` there (``watcher.backward(sequence, grad)``). Every activation of one sequence is
    held for its backward pass (unlike the sweeps, which hold one segment's). Returns ``L`` summed over
    the sequences of every process (``projected_loss`` with nothing removed)."""
    watchers: dict[fx.Node, list] = {}
    for node, watcher in watched:
        watchers.setdefault(node, []).append(watcher)
    current: dict[str, Any] = {}

    def record(sequence: int, node: fx.Node):
        def hook(grad: torch.Tensor) -> None:
            for watcher in watchers[node]:
                watcher.backward(sequence, grad)
        return hook

    class Watched(fx.Interpreter):
        def run_node(self, n: fx.Node):
            value = super().run_node(n)
            if n in watchers and isinstance(value, torch.Tensor) and value.is_floating_point():
                for watcher in watchers[n]:
                    watcher.forward(current["sequence"], value, current["real"])
                if not value.requires_grad:  # the first watched value: the gradient starts flowing here
                    value.requires_grad_()
                value.register_hook(record(current["sequence"], n))
            return value

    frozen = [p for p in gm.parameters() if p.requires_grad]
    device = graph_device(gm)
    summed = 0.0
    try:
        for p in frozen:
            p.requires_grad_(False)
        for sequence, batch in enumerate(tqdm(sequences, desc="fxslice: output sensitivity", unit="seq",
                                              disable=not progress or rank() != 0)):
            args, kwargs, ids, real = _scored_inputs(batch, device)
            current.update(sequence=sequence, real=real)
            with torch.enable_grad():
                loss = _summed_loss(Watched(gm).run(*flat_inputs(gm, args, kwargs)), ids, real)
                if loss.requires_grad:
                    loss.backward()
            summed += float(loss.detach())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return float(total(summed))


def _scored_inputs(batch: Batch, device) -> tuple[tuple, dict, torch.Tensor, torch.Tensor]:
    """A batch moved to ``device``, its ``input_ids`` and the mask of its real tokens."""
    args, kwargs = optree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch,
                                   none_is_leaf=True)
    ids = kwargs.get("input_ids", next((x for x in optree.tree_leaves(args) if isinstance(x, torch.Tensor)
                                        and x.dim() == 2 and not x.is_floating_point()), None))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise CalibrationError("the sensitivity schedule needs the calibration batches' input_ids (a "
                               "[batch, tokens] tensor) to compute the next-token loss")
    mask = kwargs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if not isinstance(mask, torch.Tensor) else mask.to(torch.bool)
    return args, kwargs, ids, real


def _summed_loss(out: Any, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The next-token cross-entropy of the graph's logits, summed over the real tokens."""
    logits = logits_of(out)
    if logits is None or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise CalibrationError("the sensitivity schedule needs logits of shape [batch, tokens, vocab] "
                               "among the graph's outputs")
    scored = real[:, 1:] & real[:, :-1]
    predicted = logits[:, :-1][scored]
    predicted = predicted.to(torch.promote_types(predicted.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(predicted, ids[:, 1:][scored], reduction="sum")


@torch.no_grad()
def projected_loss(gm: fx.GraphModule, sequences: list[Batch], writes: list[fx.Node], bases: list[torch.Tensor],
                   width: int | None) -> float:
    """The next-token loss summed over ``sequences`` (all processes) when every value of ``writes`` keeps
    only its part in the first ``width`` columns of its sequence's basis (``bases[n mod folds]``, as
    ``RotatedSquares`` sees it): what narrowing a stream under one rotation does to the writes into it,
    measured rather than estimated (``width=None``: nothing is removed)."""
    cut = frozenset(writes) if width is not None else frozenset()
    current: dict[str, torch.Tensor] = {}

    class Projected(fx.Interpreter):
        def run_node(self, n: fx.Node):
            value = super().run_node(n)
            if n in cut and isinstance(value, torch.Tensor) and value.is_floating_point():
                rest = current["basis"][:, width:].to(value)  # y − (y Q_rest) Q_restᵀ
                value = value - (value @ rest) @ rest.T
            return value

    device = graph_device(gm)
    loss = 0.0
    for sequence, batch in enumerate(sequences):
        args, kwargs, ids, real = _scored_inputs(batch, device)
        current["basis"] = bases[sequence % len(bases)].to(device)
        loss += float(_summed_loss(Projected(gm).run(*flat_inputs(gm, args, kwargs)), ids, real))
    return float(total(loss))


def fold_rotations(gm: fx.GraphModule, sequences: list[Batch], reads: list[fx.Node], folds: int = 2,
                   progress: bool = True) -> list[torch.Tensor]:
    """One stream's principal directions per fold of ``sequences`` (sequence ``n`` in fold ``n mod folds``):
    for fold ``f``, the PCA of ``Σ xᵀx`` over the values ``reads`` (the stream's norm inputs, as a shared
    rotation sees them) of every other fold (of all sequences when ``folds`` is 1)."""
    sweep = _Sweep(gm, sequences, reads)
    covariances = _FoldCovariances(sweep.masks, folds)
    for node in tqdm(reads, desc="fxslice: measuring the stream's spectrum", unit="read",
                     disable=not progress or rank() != 0):
        covariances.sequences = 0
        sweep.run_until(node, covariances)
    h = total(covariances.h)
    whole = sum(h)
    return [from_rank0(lambda: pca(whole - part if folds > 1 else whole)[1]) for part in h]


def first_sequences(batches: list[Batch], tokens: int) -> list[Batch]:
    """One batch per sequence, over this process's share of the first ``tokens`` calibration tokens."""
    return [row for batch in first_tokens(batches, -(-tokens // world_size())) for row in _sequences(batch)]


def _sequences(batch: Batch) -> list[Batch]:
    """A batch as one batch per sequence."""
    leaves = [x for x in optree.tree_leaves(batch) if isinstance(x, torch.Tensor) and x.dim() > 1]
    if not leaves:
        return [batch]
    rows = leaves[0].shape[0]
    return [_rows(batch, rows, slice(r, r + 1)) for r in range(rows)]


def _rows(batch: Batch, rows: int, which: slice) -> Batch:
    """``batch`` with the rows ``which`` of every tensor input whose leading size is the batch's ``rows``."""
    return optree.tree_map(lambda x: x[which] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows
                           else x, batch, none_is_leaf=True)


READS_BLOCK = 16384
"""Rows of a reading weight converted to float64 at once by ``_reads``."""


def _reads(gm: fx.GraphModule, state: State) -> torch.Tensor:
    """``Σ W Wᵀ`` over the weights that read ``state`` (the input axis first; skip matrices left out)."""
    reads = torch.zeros(state.width, state.width, dtype=torch.float64)
    for side in dict.fromkeys(s.use.input_side() for s in state.sinks if not s.use.node.meta.get(SKIP_EDGE)):
        weight = get_tensor(gm, side.target).detach()
        rows = torch.movedim(weight, side.axis, -1).reshape(-1, state.width)  # W Wᵀ = Σ over rows of rowᵀrow
        # In float64 a block of rows at a time: a head tied to a large vocabulary is never copied whole.
        for block in rows.split(READS_BLOCK):
            reads += gram(block.to(torch.float64)).to(reads.device)
    return reads


def lost_fraction(fitted: torch.Tensor, unit: torch.Tensor, pca=pca, reads: torch.Tensor | None = None) -> torch.Tensor:
    """``loss[k]`` for ``k = 0 … d``: the mean fraction of a token's squared length outside the first ``k``
    principal directions of the covariance ``fitted``, over the tokens whose unit-length covariance is
    ``unit``: ``1 − Σ_{j<k} q_jᵀ Û q_j / tr Û``.

    With ``reads`` (``Σ W Wᵀ`` over the weights that read the state, ``d × d``): the fraction of what they
    compute from a token that is lost, ``tr(E_k M E_k G) / tr(M G)`` with ``M = QᵀÛQ``, ``G = QᵀRQ`` and
    ``E_k`` keeping the directions from ``k`` on. A few very large directions then count only as much
    as the readers use them."""
    _, rotation = pca(fitted)
    if reads is not None:
        p = (rotation.T @ unit @ rotation) * (rotation.T @ reads.to(rotation) @ rotation)
        # Σ_{i,j ≥ k} p_ij for every k: the diagonal of the 2-D cumulative sum of p read backwards.
        suffix = p.flip(0, 1).cumsum(0).cumsum(1).diagonal().flip(0)
        return torch.cat([suffix / suffix[0], p.new_zeros(1)]).clamp_min(0.0)
    # q_jᵀ Û q_j = Σ_i (Û Q)_ij Q_ij: the diagonal of QᵀÛQ without the second product.
    kept = ((unit @ rotation) * rotation).sum(0).cumsum(0) / torch.trace(unit)
    return torch.cat([kept.new_ones(1), (1.0 - kept).clamp_min(0.0)])


class PCARotation:
    """``RotationSource`` whose Q for each state is the PCA of its activations (SliceGPT).

    Per-state mode runs the sequential sweep described in the module docstring. ``shared=True``
    accumulates one covariance over every value the norms of a stream read, then rotates the stream once.
    """

    name = "pca"

    def __init__(self, batches: list[Batch], shared: bool = False, progress: bool = True, rescale: float = 0.0):
        self.batches = batches
        self.shared = shared
        self.progress = progress
        self.rescale = rescale
        self.gains: dict[State, float] = {}
        self.pca = _Timed()
        # The states that will keep fewer directions than they have (rotate sets it once the widths are
        # planned); None: any. At full width every Q is exact, so only these need more than their own PCA.
        self.narrowed: frozenset[State] | None = None

    @property
    def eigh_seconds(self) -> float:
        return self.pca.seconds

    folds = 2
    """``losses`` fits the principal directions on all pre-pass sequences but one fold and measures the
    loss on that fold, for each fold (1: fitted and measured on the same tokens)."""

    def losses(self, gm: fx.GraphModule, states: list[State], tokens: int = SPECTRUM_TOKENS,
               at: str = "stream") -> list[torch.Tensor]:
        """For every state, ``loss[k]``: the mean fraction of a token's vector lost when the state keeps ``k``
        principal directions — what the state's norms see, since they rescale every token to unit RMS.

        Measured on the unsliced model from the first ``tokens`` calibration tokens (a cheap pre-pass), and
        held out: with the default two folds, the principal directions are fitted on the even sequences
        and the loss is measured on the odd ones, and the other way round (the token-weighted mean).
        Measured on the tokens it was fitted to, a spectrum looks lower-rank than it is, the more so the
        fewer distinct tokens a state has seen (the early ones), and the plan narrows those states too much.

        ``at="readers"``: the fraction of what the weights reading the state compute that is lost
        (``lost_fraction`` with their ``Σ W Wᵀ``), for streams where a few very large directions hold
        nearly all of every token's length and so hide what the readers use.
        """
        sweep = self._pre_pass(gm, [s.anchor for s in states], tokens)
        result = []
        for state in tqdm(states, desc="fxslice: measuring spectra", disable=not self.progress or rank() != 0, unit="state"):
            folds = _FoldCovariances(sweep.masks, self.folds)
            sweep.run_until(state.anchor, folds)
            folds.h, folds.unit, folds.tokens = total((folds.h, folds.unit, folds.tokens))
            h = sum(folds.h)
            held = [i for i, n in enumerate(folds.tokens) if n]
            reads = _reads(gm, state) if at == "readers" else None
            if len(held) > 1:
                # Fold i's tokens against the directions of the other folds: H − H_i.
                result.append(sum(folds.tokens[i] * lost_fraction(h - folds.h[i], folds.unit[i], self.pca, reads)
                                  for i in held) / sum(folds.tokens))
            else:  # one fold, or a single sequence: nothing to hold out
                result.append(lost_fraction(h, sum(folds.unit), self.pca, reads))
        return result

    def _pre_pass(self, gm: fx.GraphModule, targets: list[fx.Node], tokens: int) -> "_Sweep":
        """A sweep of the unrotated model over the first ``tokens`` calibration tokens (under
        torch.distributed, the first of every process's share) up to ``targets``."""
        # Before any rotation the skip matrices rotate inserted are identities: the pre-pass skips them.
        identities = frozenset(n for n in gm.graph.nodes if n.meta.get(SKIP_EDGE) and len(n.args) == 2
                               and n.args[1].op == "get_attr" and _is_identity(get_tensor(gm, n.args[1].target)))
        return _Sweep(gm, first_tokens(self.batches, -(-tokens // world_size())), targets, identities)

    def coupled_covariances(self, gm: fx.GraphModule, states: list[State],
                            tokens: int = SPECTRUM_TOKENS) -> dict[State, torch.Tensor]:
        """For every state with coupled sources (the bridge in front of a head tied to the state's
        weights), ``Σ zᵀz`` of what they write, ``z``, measured on the unrotated model over the first
        ``tokens`` calibration tokens."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        coupled = {s: sorted((src.node for src in s.sources if src.coupled), key=order.get) for s in states}
        coupled = {s: nodes for s, nodes in coupled.items() if nodes}
        if not coupled:
            return {}
        sweep = self._pre_pass(gm, [n for nodes in coupled.values() for n in nodes], tokens)
        result = {}
        for state, nodes in sorted(coupled.items(), key=lambda item: order[item[1][0]]):
            covariance = _Covariance(sweep.masks)
            for node in nodes:
                sweep.run_until(node, covariance)
            result[state] = total(covariance.h)
        return result

    def run(self, gm: fx.GraphModule, states: list[State], apply) -> None:
        if self.shared:
            return self._run_shared(gm, states, apply)
        # A state with coupled sources is read twice: by its own sinks, and by a head tied to its weights
        # through what the coupled sources write (z, near the graph's end): that head computes
        # (z Q_k)(E Q_k)ᵀ, so it keeps only z's part in the state's first k directions. Its Q is the PCA of
        # both covariances, each over its trace, so the k directions serve both readers.
        narrowed = states if self.narrowed is None else [s for s in states if s in self.narrowed]
        coupled = self.coupled_covariances(gm, narrowed)
        sweep = _Sweep(gm, self.batches, [s.anchor for s in states])
        heads = output_heads(gm)
        # The head, and what feeds it directly (the bridge in front of a tied head): never rescaled.
        heads = frozenset(heads | {n for n in gm.graph.nodes if any(u in heads for u in n.users)})
        for state in tqdm(states, desc="fxslice: rotating residual states", disable=not self.progress or rank() != 0, unit="state"):
            covariance = _Covariance(sweep.masks)
            sweep.run_until(state.anchor, covariance)
            h = total(covariance.h)
            if state in coupled and float(h.trace()) > 0 and float(coupled[state].trace()) > 0:
                h = h / h.trace() + coupled[state] / coupled[state].trace()
            values, rotation = self.pca(h)
            width = apply(state, rotation, values)
            rescaling = bool(self.rescale) and width < state.width
            kept = sweep.transform(state.nodes, rotation[:, :width], state.anchor if rescaling else None)
            if rescaling:
                # The norms now see x Q_k, each token with a fraction r = ‖x Q_k‖ / ‖x‖ of its length;
                # their sinks are multiplied by mean(r)^-RESCALE_EXPONENT (see fxslice.passes.slice).
                # Not at the output head: there the gain would only change the logits' temperature.
                gain = kept**-self.rescale
                if scale_normed_sinks(gm, state, gain, skip=heads):
                    self.gains[state] = gain

    def _run_shared(self, gm: fx.GraphModule, states: list[State], apply) -> None:
        reads = {s: s.normed_values() for s in states}
        sweep = _Sweep(gm, self.batches, [n for s in states for n in reads[s]])
        for state in tqdm(states, desc="fxslice: rotating residual streams", disable=not self.progress or rank() != 0, unit="stream"):
            covariance = _Covariance(sweep.masks)
            for node in reads[state]:
                sweep.run_until(node, covariance)
            values, rotation = self.pca(total(covariance.h))
            width = apply(state, rotation, values)
            sweep.transform(state.nodes, rotation[:, :width])
