"""shrink_mlp: delete inner channels of every MLP and refit its down projection on calibration data.

For an MLP ``y = h W`` (``h``: the ``m`` inner channels after the activation, ``W``: the down projection
in the row-vector convention, ``m × n``) keeping the channels ``S`` is exact up to ``h``
(``fxslice.analysis.mlps``), and the down projection becomes ``β_S``, chosen to keep
``‖h W − h_S β_S‖²`` small over the calibration tokens. With ``C = Σ hᵀh`` that error is
``tr((W − β)ᵀ C (W − β))`` where ``β`` is zero outside ``S``. Channels are removed greedily, those whose
removal raises the error least first (Optimal Brain Surgeon): with ``A = (C + λI)⁻¹`` removing channel
``j`` and re-solving for the others costs ``‖β_j‖² / A_jj``, and the solution updates as
``β ← β − A_{:j} β_j / A_jj``, ``A ← A − A_{:j} A_{j:} / A_jj`` (``prune_channels`` removes a few
at a time with the joint form of the same update). The damping ``λ`` (``ridge`` times
the mean of ``diag C``) keeps ``A`` defined for dead channels and shrinks the refit toward ``W``.
When the down projection has a bias, a constant channel that is never removed lets the refit move the
bias too (the deleted channels' mean output). Experts held as 3-D weights (``MLP.groups``) keep the same
number of channels each, chosen and refit against each expert's own ``C`` (its routed rows only).

The MLPs are shrunk in graph order in one sweep over the calibration data: each one's statistics are
measured on the model whose earlier MLPs (and residual states, if ``slice`` ran before) are already
compressed. ``shrink_mlp(0.25)`` keeps ``(1 − 0.25)·m`` channels rounded down to ``multiple_of``;
``widths=`` chooses per MLP. At ratio 0 it changes nothing. The plan records each MLP's refit error
on the calibration tokens, ``tr(DᵀCD) / tr(WᵀCW)`` with ``D = W − β`` (``refit_error``): the fraction of
the output's energy the refit loses, 0 where nothing was removed.
"""

from __future__ import annotations

import builtins
import heapq
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ..analysis.mlps import MLP, SkippedMLP, find_mlps, mlp_module
from ..distributed import from_rank0, total
from ..errors import UnsupportedGraphError, module_path
from ..graph import STREAMED, get_tensor, set_tensor, unique_parameters
from ..plan import Plan
from ..rewrite import narrow_axis, select_axis, write_width
from .base import Context, FxslicePass, StateParameters, kept_width, recorded

__all__ = ["BUDGET_SCHEDULES", "PLANNED", "STEEP_STREAM_CUT", "ShrinkMLP", "budget_widths", "check_budget", "curve_at",
           "error_curve", "prune_channels", "refit_error", "removal_path", "sensitive_widths", "shrink_mlp", "uniform_widths"]

BUDGET_SCHEDULES = ("constant", "sensitivity")
"""How a budget is spread over the MLPs: every MLP the same fraction, or by their losses counted downstream."""

Widths = Mapping[str, int] | Sequence[int] | Callable[[int, int], int]

STEEP_STREAM_CUT = 2.0
"""A planned stream width whose measured cut alone multiplies the held-out perplexity by more than this
is warned about (``ShrinkMLP.plan_widths``)."""

MEASURED = ("refit_error", "planned")
"""``details["shrink_mlp"]`` keys of what calibration measured: each MLP's refit error and, with
``schedule="sensitivity"``, the planner's estimates (``ShrinkMLP.plan_widths``); replayed as recorded."""

PLANNED = "budget_plan"
"""``Plan.details`` key of the widths a ``rotate`` before ``slice(budget=…, schedule="sensitivity")`` chose
with the stream's width: ``{"stream": k, "mlps": [[name, width], …], …}``, which the MLPs then keep."""


def removal_path(c: torch.Tensor, w: torch.Tensor, remove: int, ridge: float, fixed: int = 0, block: int = 8):
    """The greedy removal of ``remove`` of the first ``m - fixed`` channels (the module docstring): yields,
    after each block, the mask of channels still removable, the refit ``β`` and the block's step
    ``(U, S)``, ``β ← β − U S`` (``U``: ``m × block``, zero at the channels already removed). ``c``:
    ``Σ hᵀh`` (float64, ``m × m``); ``w``: ``m × n``; the cheapest ``block`` channels ``J`` go together,
    with the exact joint update ``U = A_{:J}``, ``S = A_JJ⁻¹ β_J``, ``A ← A − A_{:J} A_JJ⁻¹ A_{J:}``.

    That update leaves the rows and columns ``J`` of ``A`` zero, so ``A`` is held only over ``rows``, the
    channels not yet removed (plus a few removed since the last compaction): the rank-``block`` updates,
    most of the path's work, shrink with it."""
    m = c.shape[0]
    damp = ridge * float(c.diagonal().mean()) or ridge
    a = torch.cholesky_inverse(torch.linalg.cholesky(c + damp * torch.eye(m, dtype=c.dtype, device=c.device)))
    beta = w.to(torch.float64).clone()
    candidate = torch.ones(m, dtype=torch.bool)
    candidate[m - fixed:] = False
    rows = torch.arange(m, device=c.device)
    removable = candidate.to(c.device)  # over ``rows``
    kept = torch.ones(m, dtype=torch.bool, device=c.device)  # over ``rows``: not removed (fixed included)
    while remove > 0:
        cost = beta.square().sum(1)[rows] / a.diagonal()
        cost[~removable] = math.inf
        j = torch.topk(cost, builtins.min(block, remove), largest=False).indices
        solve = torch.linalg.solve(a[j][:, j], torch.cat([beta[rows[j]], a[j]], 1))  # A_JJ⁻¹ [β_J, A_J:]
        u, step = a[:, j], solve[:, : beta.shape[1]]
        # U is zero outside ``rows``: spread over all m rows, one dense product updates β (several
        # times faster than adding ``U S`` row by row at ``rows``).
        spread = torch.zeros(m, u.shape[1], dtype=u.dtype, device=u.device)
        spread[rows] = u
        beta.addmm_(spread, step, alpha=-1.0)
        a.addmm_(u, solve[:, beta.shape[1]:], alpha=-1.0)  # in one pass: A is most of the path's memory traffic
        candidate[rows[j].cpu()] = False
        removable[j], kept[j] = False, False
        remove -= j.numel()
        yield candidate, beta, (spread, step)
        if int((~kept).sum()) * 4 > rows.numel():  # compact: the removed rows and columns are zero
            rows, a, removable = rows[kept], a[kept][:, kept], removable[kept]
            kept = torch.ones(rows.numel(), dtype=torch.bool, device=c.device)


def prune_channels(c: torch.Tensor, w: torch.Tensor, keep: int, ridge: float, fixed: int = 0,
                   block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``keep`` of the first ``m - fixed`` channels (the last ``fixed`` are always kept): returns the
    kept channel indices (ascending) and the refit ``β`` on them (``keep + fixed`` rows), by
    ``removal_path``."""
    m = c.shape[0]
    candidate, beta = torch.ones(m, dtype=torch.bool), w.to(torch.float64)
    candidate[m - fixed:] = False
    for candidate, beta, _ in removal_path(c, w, m - fixed - keep, ridge, fixed, block):
        pass
    kept = torch.cat([candidate[: m - fixed].nonzero().squeeze(1), torch.arange(m - fixed, m)])
    return kept[:keep], beta[kept]


def refit_error(c: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, beta: torch.Tensor) -> tuple[float, float]:
    """``(tr(DᵀCD), tr(WᵀCW))``, ``D = W − β``: the refit's squared error over the tokens of ``c`` (``Σ hᵀh``)
    and the energy of the output it replaces; ``beta`` holds ``β``'s rows at the channels ``kept``, zero
    elsewhere. Both from one product ``C [D W]``, in float32: a diagnostic, the plan's record of what the
    refit lost."""
    d = w.to(torch.float64).clone()
    d[kept] -= beta.to(torch.float64)
    pair = torch.cat([d, w.to(torch.float64)], 1).float()
    per_column = (pair * (c.float() @ pair)).sum(0, dtype=torch.float64)
    n = w.shape[1]
    return float(per_column[:n].sum()), float(per_column[n:].sum())


def error_curve(c: torch.Tensor, w: torch.Tensor, ridge: float, fixed: int = 0, floor: int = 8,
                points: int = 64, test: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> dict[int, float]:
    """The refit's error ``Σ_j weights_j (Dᵀ T D)_jj``, ``D = W − β_k``, at about ``points`` widths ``k``
    from ``m`` down to ``floor``, along the greedy removal path fitted on ``c`` (``removal_path``, in blocks
    of ``m / points``). ``T``: ``test``, the Gram ``Σ hᵀh`` of tokens the fit never saw (default ``c``,
    the in-sample error); ``weights``: one per output column (default ones).

    Each step ``D ← D + U S`` adds ``2 diag(Sᵀ Uᵀ T D) + diag(Sᵀ Uᵀ T U S)`` to ``diag(Dᵀ T D)``: two
    products of ``block`` columns a step beside the path's own."""
    m = c.shape[0] - fixed
    floor = builtins.min(floor, m)
    test = c if test is None else test
    weights = torch.ones(w.shape[1]) if weights is None else weights
    weights = weights.to(device=c.device, dtype=torch.float64)
    d = torch.zeros(w.shape, dtype=torch.float64, device=c.device)
    per_column = torch.zeros(w.shape[1], dtype=torch.float64, device=c.device)
    curve = {m: 0.0}
    for candidate, _, (u, step) in removal_path(c, w, m - floor, ridge, fixed, builtins.max(1, m // points)):
        tu = test @ u
        per_column += 2 * (step * (tu.T @ d)).sum(0) + (step * ((u.T @ tu) @ step)).sum(0)
        d.addmm_(u, step)
        curve[int(candidate.sum())] = float(per_column @ weights)
    return curve


def curve_at(curve: Mapping[int, float], k: int) -> float:
    """``curve`` (``error_curve``) at width ``k``, linear between the widths it holds."""
    lower = builtins.max((x for x in curve if x <= k), default=builtins.min(curve))
    upper = builtins.min((x for x in curve if x >= k), default=builtins.max(curve))
    if lower == upper:
        return curve[lower]
    return curve[lower] + (curve[upper] - curve[lower]) * (k - lower) / (upper - lower)


@dataclass(frozen=True)
class ShrinkMLP(FxslicePass):
    """Delete the inner channels of every MLP that matter least to its output; refit the down projection."""

    ratio: float | None = None
    widths: Widths | None = field(default=None, compare=False)
    budget: float | None = None
    multiple_of: int = 8
    ridge: float = 1e-2
    schedule: str = "constant"
    strict: bool = False
    progress: bool = True
    name = "shrink_mlp"

    def __post_init__(self):
        if sum(x is not None for x in (self.ratio, self.widths, self.budget)) != 1:
            raise ValueError("shrink_mlp needs exactly one of ratio=… (e.g. shrink_mlp(0.25)), widths=… or budget=…")
        check_budget(self.budget)
        if self.schedule not in BUDGET_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r} for a budget; choose one of "
                             f"{', '.join(BUDGET_SCHEDULES)}")
        if self.schedule != "constant" and self.budget is None:
            raise ValueError(f"schedule={self.schedule!r} spreads a budget: give shrink_mlp(budget=…, "
                             f"schedule={self.schedule!r})")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0.0 <= self.ratio < 1.0):
            raise ValueError(f"shrink_mlp ratio must be a number in [0, 1): the fraction of each MLP's inner "
                             f"channels to delete; got {self.ratio!r}")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive integer; got {self.multiple_of!r}")
        if not isinstance(self.ridge, (int, float)) or not self.ridge > 0:
            raise ValueError(f"ridge must be a positive number; got {self.ridge!r}")

    def width(self, index: int, mlp: MLP) -> int:
        """The inner width MLP ``index`` keeps."""
        m = mlp.width
        if callable(self.widths):
            k = self.widths(index, m)
        elif isinstance(self.widths, Mapping):
            k = self.widths.get(mlp.name, m)
        elif self.widths is not None:
            k = self.widths[index] if index < len(self.widths) else m
        elif self.ratio == 0:
            k = m
        else:
            k = kept_width(1.0 - self.ratio, m, self.multiple_of)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
            raise UnsupportedGraphError(f"shrink_mlp: width {k!r} for the MLP of {mlp_module(mlp)} is not an "
                                        f"integer in [1, {m}]")
        return k

    def needs_calibration(self) -> str | None:
        return "shrink_mlp chooses channels and refits the down projections from activations"

    def back_propagates(self) -> bool:
        return self.schedule == "sensitivity"

    def run(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:
        details, seconds = self.shrink(gm, plan, context)
        return plan.with_pass(self.spec(), details={self.name: details}, timings={f"{self.name}_s": seconds})

    def shrink(self, gm: fx.GraphModule, plan: Plan, context: Context) -> tuple[dict, float]:
        """Shrink every MLP (or, replaying, rebuild the recorded widths); returns what the plan records
        under ``details["shrink_mlp"]`` and the seconds it took."""
        start = time.perf_counter()
        mlps, skipped = find_mlps(gm)
        if self.strict and skipped:
            raise UnsupportedGraphError("shrink_mlp: " + " | ".join(str(s) for s in skipped))
        if context.replay is not None:
            kept = recorded(context, ShrinkMLP.name, "mlps", [m.name for m in mlps], "MLPs")
            widths = [kept[m.name] for m in mlps]
            # what was measured when the plan was made (a plan saved before they were recorded has none)
            measures = {k: v for k, v in context.replay.details[ShrinkMLP.name].items() if k in MEASURED}
            for mlp, k in zip(mlps, widths):
                for side in (*mlp.channel_sides, mlp.down.input_side()):
                    narrow_axis(gm, side, k)
                write_width(mlp.literals, k)
        else:
            if self.budget is not None:
                dense = plan.parameters_before or unique_parameters(gm)
                planned = plan.details.get(PLANNED)
                if self.schedule == "sensitivity" and planned is not None:  # chosen with the stream's width
                    widths = [dict(planned["mlps"]).get(m.name, m.width) for m in mlps]
                    estimates = {k: v for k, v in planned.items() if k != "mlps"}
                elif self.schedule == "sensitivity":
                    budget_widths(gm, mlps, self.budget, dense, self.multiple_of, skipped)  # refuses before measuring
                    _, widths, estimates = self.plan_widths(gm, mlps, self.budget * dense, context)
                else:
                    widths = budget_widths(gm, mlps, self.budget, dense, self.multiple_of, skipped)
            else:
                widths = [self.width(i, m) for i, m in enumerate(mlps)]
            errors = self._calibrate(gm, mlps, widths, context)
            measures = {"refit_error": [[m.name, e] for m, e in zip(mlps, errors)]}
            if self.schedule == "sensitivity":
                measures["planned"] = estimates
        prefix = plan.module_prefix
        details = {"mlps": [[m.name, m.width, k] for m, k in zip(mlps, widths)],
                   "modules": [mlp_module(m, prefix) for m in mlps],
                   "skipped": [f"{module_path(s.node, prefix)}: {s.reason}" for s in skipped], **measures}
        return details, time.perf_counter() - start

    def plan_widths(self, gm: fx.GraphModule, mlps: list[MLP], goal: float, context: Context,
                    stream: Any = None) -> tuple[int | None, list[int], dict]:
        """``schedule="sensitivity"``: the MLPs' widths (and, given the residual ``stream``'s one state
        under a shared rotation, its width) that leave at most ``goal`` parameters, from losses measured on
        the dense model and held out. Returns the stream's width (None without one), the MLPs' widths and
        the estimated losses and parameter count.

        Each MLP's refit error along its removal path is fitted on every other calibration sequence and
        scored on the rest (and the other way round: an in-sample curve overrates what a narrow refit
        keeps), each token's error counted at the loss's gradient there, spread over the output features
        as their mean squared gradients (``FeatureSquares``: what an error costs downstream).
        The stream's loss at width ``k``: every write into it loses its share in the discarded principal
        directions, counted by the loss's gradient there (``RotatedSquares``; the directions fitted on the
        other fold); that curve's scale is then measured (``projected_loss``): first-order terms can
        misjudge a large cut of a stream by orders of magnitude. The stream's width is the one whose loss
        plus the MLPs' (their widths chosen for what that width leaves of the budget, ``sensitive_widths``)
        is least."""
        from ..calibrate import (SENSITIVITY_TOKENS, FeatureSquares, RotatedSquares, backward_statistics,
                                 batch_tokens, first_sequences, fold_rotations, projected_loss, sweep_inner)

        if gm.meta.get(STREAMED) is not None:
            raise UnsupportedGraphError("schedule='sensitivity' back-propagates through the whole model at once, "
                                        "which a checkpoint streamed from disk never holds: use the default "
                                        "schedule, or load the model into memory first")
        # What each stream width leaves of the budget to the MLPs: counted before anything is measured.
        counter = StateParameters(gm, [stream] if stream is not None else [], mlps)
        full = [m.width for m in mlps]
        whole = () if stream is None else (stream.width,)
        narrower = () if stream is None else range((stream.width - 1) // self.multiple_of * self.multiple_of,
                                                   0, -self.multiple_of)
        options = []  # (stream widths, MLP parameters per channel there, the count with the MLPs whole, uniform)
        for widths in [whole, *((k,) for k in narrower)]:
            per_channel = counter.per_channel(widths, full)
            base = unique_parameters(gm) - counter.count(whole) + counter.count(widths)
            uniform = uniform_widths(full, per_channel, base, goal, self.multiple_of)
            if uniform is not None:
                options.append((widths, per_channel, base, uniform))
        if not options:
            raise UnsupportedGraphError(f"schedule='sensitivity' cannot meet a budget of {goal:.0f} parameters "
                                        f"with the {len(mlps)} MLPs found and the stream narrowed to "
                                        f"{self.multiple_of}: choose a larger budget")
        sequences = first_sequences(list(context.calibration), SENSITIVITY_TOKENS)
        # Two folds where every process holds two sequences or more; else the losses are in-sample.
        folds = 1 if total(int(len(sequences) < 2)) else 2
        squares = [FeatureSquares(m.down.node) for m in mlps]
        watched = [(m.down.node, sq) for m, sq in zip(mlps, squares)]
        writes = []
        if stream is not None:
            bases = fold_rotations(gm, sequences, stream.normed_values(), folds, self.progress)
            writes = [RotatedSquares(bases) for _ in stream.sources]
            watched += [(source.node, w) for source, w in zip(stream.sources, writes)]
        dense_loss = backward_statistics(gm, sequences, watched, self.progress)
        fisher = [sq.mean() for sq in squares]
        curves: list[dict[int, float]] = []

        def measure(index: int, *parts) -> None:
            mlp, curve = mlps[index], {}
            _, w, fixed = _down_weights(gm, mlp)
            # every expert keeps the same width: their errors add
            systems = [(w, fixed)] if mlp.groups is None else [(w_e.reshape(-1, w_e.shape[-1]).T, 0) for w_e in w]
            features = systems[0][0].shape[1]
            fits = [_down_gram(mlp, part) for part in parts]
            if per_token[index] is not None:
                # (∂L/∂y_tj)² ≈ ‖∂L/∂y_t‖² F_j / Σ F: each token's error counted at its own gradient. Where a
                # norm follows, a token's gradient is large exactly where its output (and the refit's error)
                # is small, and the product of the two means overrates the loss by orders of magnitude.
                tests = [_down_gram(mlp, part, weighted=True) for part in parts]
                weights = fisher[index] / fisher[index].sum().clamp_min(torch.finfo(torch.float64).tiny)
            else:
                # one weight per output feature; the mean where the gradient's features are not the weight's columns
                tests = fits
                weights = fisher[index] if fisher[index].numel() == features else fisher[index].mean().expand(features)
            for fit, test in zip(fits, tests[::-1]):
                for e, (w_e, f) in enumerate(systems):
                    c_e, t_e = (fit, test) if mlp.groups is None else (fit[e], test[e])
                    part = error_curve(c_e, w_e, self.ridge, f, self.multiple_of, test=t_e, weights=weights)
                    curve = {k: curve.get(k, 0.0) + v for k, v in part.items()}
            curves.append(curve)

        # Token weights where the gradient's features are the down weight's columns (routed expert rows
        # line up with no token).
        columns = [get_tensor(gm, m.down.weight).numel() // m.width if m.groups is None else None for m in mlps]
        per_token = [sq.per_row if n is not None and f.numel() == n else None
                     for sq, f, n in zip(squares, fisher, columns)]
        sweep_inner(gm, sequences, _sweep_inputs(mlps), measure, progress=self.progress,
                    desc="fxslice: measuring inner widths", folds=folds, row_weights=per_token)
        discarded = torch.zeros(1, dtype=torch.float64)
        if stream is not None:
            per_direction = sum(w.losses() for w in writes)
            # discarded[k]: the loss of keeping the first k directions (the sum over the rest)
            discarded = torch.cat([per_direction.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])

        def choose(scale: float) -> tuple:
            best = None
            for widths, per_channel, base, uniform in options:
                lost = scale * float(discarded[widths[0]]) if widths else 0.0
                if best is not None and lost >= best[0]:
                    break  # the stream's loss only grows as it narrows
                chosen = sensitive_widths(curves, full, uniform, per_channel, base, goal, self.multiple_of)
                loss = lost + sum(curve_at(c, k) for c, k in zip(curves, chosen))
                if best is None or loss < best[0]:
                    count = base - sum((m - k) * n for m, k, n in zip(full, chosen, per_channel))
                    best = (loss, widths, chosen, lost, count)
            return best

        # The stream's first-order losses give the shape of its curve; its scale is measured: the loss of
        # the held-out sequences with every write cut to the chosen width (twice the rise, as the Fisher
        # terms count it), until the choice no longer moves (at most three measurements).
        scale, measured = 1.0, {}
        best = choose(scale)
        while stream is not None and best[1][0] < stream.width and best[1][0] not in measured and len(measured) < 3:
            k = best[1][0]
            measured[k] = projected_loss(gm, sequences, [src.node for src in stream.sources], bases, k) - dense_loss
            if float(discarded[k]) <= 0:
                break
            scale = builtins.max(2 * measured[k], 0.0) / float(discarded[k])
            best = choose(scale)
        loss, widths, chosen, lost, count = best
        if stream is not None and widths[0] in measured:
            # The MLPs' losses stay first-order estimates; a steep measured cost is worth a user's look.
            scored = total(sum(batch_tokens(q) - 1 for q in sequences))
            factor = math.exp(builtins.min(measured[widths[0]] / builtins.max(scored, 1), 50.0))
            if factor > STEEP_STREAM_CUT:
                warnings.warn(f"slice(budget=…, schedule='sensitivity') narrows the residual stream from {stream.width} "
                              f"to {widths[0]}, which alone multiplies the held-out calibration perplexity by about "
                              f"{factor:.3g} (measured); the MLPs' losses it was weighed against are first-order "
                              "estimates, which can overrate them. Compare on validation text with the stream kept "
                              "whole (no rotate before the budget), or with slice(ratio, schedule='readers')",
                              stacklevel=2)
        # Rank 0's choice for every process (their losses agree up to rounding, which could tip a choice).
        chosen = from_rank0(lambda: torch.tensor([*widths, *chosen])).tolist()
        width = chosen[0] if stream is not None else None
        mlp_losses = [[m.name, curve_at(c, k)] for m, c, k in zip(mlps, curves, chosen[len(widths):])]
        return width, chosen[len(widths):], {"stream_loss": lost, "mlp_loss": loss - lost, "mlp_losses": mlp_losses,
                                             "parameters": count, "stream_scale": scale,
                                             "measured": [[k, v] for k, v in measured.items()]}

    def _calibrate(self, gm: fx.GraphModule, mlps: list[MLP], widths: list[int], context: Context) -> list[float]:
        """Shrink every MLP to its width in one sweep; returns each one's ``refit_error`` relative to its
        output's energy (0 where it keeps every channel)."""
        from ..calibrate import sweep_inner

        errors = [0.0] * len(mlps)

        def apply(index: int, statistics) -> None:
            mlp, keep = mlps[index], widths[index]
            if keep == mlp.width:
                return
            down = mlp.down
            side = down.input_side()
            weight = get_tensor(gm, down.weight)
            moved, w, fixed = _down_weights(gm, mlp)
            c = _down_gram(mlp, statistics)
            if mlp.groups is not None:  # experts: [E, ..., m]; each keeps its own channels
                # Computed once (rank 0 under torch.distributed): every process removes the same channels.
                kept, new = from_rank0(lambda: _prune_experts(statistics.h, moved, keep, self.ridge))
                lost, energy = (sum(parts) for parts in zip(*(
                    refit_error(c_e, w_e.reshape(-1, w_e.shape[-1]).T, k_e, b_e.reshape(-1, keep).T)
                    for c_e, w_e, k_e, b_e in zip(statistics.h, moved, kept, new))))
            else:
                kept, beta = from_rank0(lambda: prune_channels(c, w, keep, self.ridge, fixed))
                new = beta[:keep].T.reshape(*moved.shape[:-1], keep)
                rows = torch.cat([kept, torch.arange(c.shape[0] - fixed, c.shape[0])])  # the constant channel too
                lost, energy = refit_error(c, w, rows, beta)
            errors[index] = builtins.max(lost, 0.0) / energy if energy > 0 else 0.0  # (rounding can dip below 0)
            for channel_side in mlp.channel_sides:
                select_axis(gm, channel_side, kept)
            write_width(mlp.literals, keep)
            set_tensor(gm, down.weight, torch.movedim(new, -1, side.axis).to(weight.dtype).contiguous())
            if fixed:
                bias = get_tensor(gm, down.bias)
                shift = beta[keep].reshape(bias.shape)
                set_tensor(gm, down.bias, (bias.detach().to(torch.float64) + shift).to(bias.dtype))

        sweep_inner(gm, list(context.calibration), _sweep_inputs(mlps), apply, progress=self.progress)
        return errors


def _sweep_inputs(mlps: list[MLP]) -> list[tuple]:
    return [(m.inner, m.groups, tuple(u.node for u in m.ups)) for m in mlps]


def _down_weights(gm: fx.GraphModule, mlp: MLP) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The down weight with the inner axis last (float64), the refit's ``W`` (``m × n``; for experts the
    moved weight itself) and its fixed channel count: with a bias, a constant channel that is never
    removed lets the refit move it."""
    side = mlp.down.input_side()
    moved = torch.movedim(get_tensor(gm, mlp.down.weight).detach(), side.axis, -1).to(torch.float64)  # [..., m]
    if mlp.groups is not None:
        return moved, moved, 0
    w = moved.reshape(-1, mlp.width).T  # y = h W: m × n
    if mlp.down.bias is None:
        return moved, w, 0
    return moved, torch.cat([w, w.new_zeros(1, w.shape[1])], 0), 1


def _down_gram(mlp: MLP, statistics, weighted: bool = False) -> torch.Tensor:
    """The refit's ``C``: ``Σ hᵀh``, bordered by ``Σ h`` and the token count for the constant channel of a
    down projection with a bias (``_down_weights``); ``weighted``: the same sums with each token's weight
    (``InnerStatistics.weighted``)."""
    c, sums, count = ((statistics.weighted, statistics.weighted_sum, statistics.weighted_tokens) if weighted
                      else (statistics.h, statistics.sum, statistics.tokens))
    if mlp.groups is not None or mlp.down.bias is None:
        return c
    count = torch.as_tensor(float(count), dtype=torch.float64)
    return torch.cat([torch.cat([c, sums[:, None]], 1), torch.cat([sums, count[None]])[None, :]], 0)


def sensitive_widths(curves: Sequence[Mapping[int, float]], full: Sequence[int], uniform: Sequence[int],
                     per_channel: Sequence[int], now: int, goal: float, multiple_of: int = 8) -> list[int]:
    """Widths that leave at most ``goal`` parameters (``now`` at ``full`` widths, ``per_channel`` per inner
    channel of each MLP): ``multiple_of`` channels at a time go from the MLP whose loss (``curves``,
    counted downstream) is least after the cut, which evens out the losses; then each MLP moves halfway
    to its ``uniform`` width (the first-order losses overrate what very uneven widths gain: the
    sequential refit recovers part of a narrow MLP's error in the layers after it), and cuts by the same
    rule bring the count back within ``goal``."""
    def cut(widths: list[int]) -> list[int]:
        widths = list(widths)
        count = now - sum((m - k) * n for m, k, n in zip(full, widths, per_channel))
        # (loss after the next cut, MLP): the least first, ties to the first MLP
        options = [(curve_at(curves[i], k - multiple_of), i) for i, k in enumerate(widths) if k - multiple_of >= multiple_of]
        heapq.heapify(options)
        while count > goal:
            if not options:
                raise UnsupportedGraphError("schedule='sensitivity' cannot meet the budget with the MLPs found")
            _, i = heapq.heappop(options)
            widths[i] -= multiple_of
            count -= multiple_of * per_channel[i]
            if widths[i] - multiple_of >= multiple_of:
                heapq.heappush(options, (curve_at(curves[i], widths[i] - multiple_of), i))
        return widths

    allocated = cut(list(full))
    halfway = [builtins.min(m, builtins.max(multiple_of, round((a + u) / (2 * multiple_of)) * multiple_of))
               for m, a, u in zip(full, allocated, uniform)]
    return cut(halfway)


def uniform_widths(full: Sequence[int], per_channel: Sequence[int], now: int, goal: float,
                   multiple_of: int = 8) -> list[int] | None:
    """The widest widths, every MLP keeping the same fraction of its ``full`` channels (rounded down to
    ``multiple_of``), that leave at most ``goal`` parameters (``now`` at full width, ``per_channel`` per
    channel); None if even the narrowest do not."""
    for step in range(1024, -1, -1):
        widths = [kept_width(step / 1024, m, multiple_of) for m in full]
        if now - sum((m - k) * n for m, k, n in zip(full, widths, per_channel)) <= goal:
            return widths
    return None


def _prune_experts(grams: torch.Tensor, moved: torch.Tensor, keep: int, ridge: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``prune_channels`` for each expert ``e`` (Gram ``grams[e]``, down weight ``moved[e]``, inner axis
    last): the kept channels ``[E, keep]`` and the refit down weights ``[E, …, keep]``."""
    kept, refit = [], []
    for c, w in zip(grams, moved):
        channels, beta = prune_channels(c, w.reshape(-1, w.shape[-1]).T, keep, ridge)
        kept.append(channels)
        refit.append(beta.T.reshape(*w.shape[:-1], keep))
    return torch.stack(kept), torch.stack(refit)


def check_budget(budget) -> None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0.0 < budget <= 1.0):
        raise ValueError(f"budget must be a number in (0, 1]: the largest parameter count allowed, as a fraction "
                         f"of the dense model's; got {budget!r}")


def budget_widths(gm: fx.GraphModule, mlps: list[MLP], budget: float, dense: int, multiple_of: int = 8,
                  skipped: Sequence[SkippedMLP] = ()) -> list[int]:
    """The widest MLPs, every one keeping the same fraction of its channels (rounded down to
    ``multiple_of``), that leave ``gm`` with at most ``budget · dense`` parameters (counted exactly).
    ``skipped``: the candidates the analysis left alone, named in the refusal."""
    full = [m.width for m in mlps]
    per_channel = StateParameters(gm, [], mlps).per_channel((), full)
    now, goal = unique_parameters(gm), budget * dense
    widths = uniform_widths(full, per_channel, now, goal, multiple_of)
    if widths is not None:
        return widths
    widths = [kept_width(0.0, m, multiple_of) for m in full]
    reachable = (now - sum((m - k) * n for m, k, n in zip(full, widths, per_channel))) / dense
    if skipped:
        left = f"; {len(skipped)} MLP-like candidates were left alone, e.g. {skipped[0]}"
    elif not mlps:
        left = ("; an MLP is a linear fed by other linears through pointwise ops only (a fused projection split "
                "into equal pieces, and experts applied by a grouped matmul, count too)")
    else:
        left = ""
    raise UnsupportedGraphError(f"a budget of {budget} of the dense parameters cannot be met by shrinking the "
                                f"{len(mlps)} MLPs found (at most down to {reachable:.3f}){left}: the residual stream "
                                "and attention stay whole; choose a larger budget, add slice(ratio) before, or let the budget "
                                "narrow the stream too (an option to check on validation text): "
                                "[fuse_norm, rotate, slice(budget=…, schedule='sensitivity')]")


def shrink_mlp(ratio: float | None = None, *, widths: Widths | None = None, budget: float | None = None,
               multiple_of: int = 8, ridge: float = 1e-2, schedule: str = "constant") -> ShrinkMLP:
    """``shrink_mlp(0.25)``: the ``ShrinkMLP`` pass."""
    return ShrinkMLP(ratio=ratio, widths=widths, budget=budget, multiple_of=multiple_of, ridge=ridge,
                     schedule=schedule)
