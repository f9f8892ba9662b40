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
``widths=`` chooses per MLP. At ratio 0 it changes nothing.
"""

from __future__ import annotations

import builtins
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ..analysis.mlps import MLP, SkippedMLP, find_mlps, mlp_module
from ..distributed import from_rank0
from ..errors import UnsupportedGraphError, module_path
from ..graph import get_tensor, set_tensor, tensor_meta, unique_parameters
from ..plan import Plan
from ..rewrite import narrow_axis, select_axis, write_width
from .base import Context, FxslicePass, kept_width, recorded

__all__ = ["ShrinkMLP", "budget_widths", "check_budget", "prune_channels", "shrink_mlp"]

Widths = Mapping[str, int] | Sequence[int] | Callable[[int, int], int]


def prune_channels(c: torch.Tensor, w: torch.Tensor, keep: int, ridge: float, fixed: int = 0,
                   block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``keep`` of the first ``m - fixed`` channels (the last ``fixed`` are always kept): returns the
    kept channel indices (ascending) and the refit ``β`` on them (``keep + fixed`` rows). ``c``: ``Σ hᵀh``
    (float64, ``m × m``); ``w``: ``m × n``. See the module docstring; the ``block`` cheapest channels
    are removed together, with the exact joint update ``β ← β − A_{:J} A_JJ⁻¹ β_J``,
    ``A ← A − A_{:J} A_JJ⁻¹ A_{J:}``."""
    m = c.shape[0]
    damp = ridge * float(c.diagonal().mean()) or ridge
    a = torch.cholesky_inverse(torch.linalg.cholesky(c + damp * torch.eye(m, dtype=c.dtype)))
    beta = w.to(torch.float64).clone()
    candidate = torch.ones(m, dtype=torch.bool)
    candidate[m - fixed:] = False
    remove = m - fixed - keep
    while remove > 0:
        cost = (beta * beta).sum(1) / a.diagonal()
        cost[~candidate] = math.inf
        j = torch.topk(cost, builtins.min(block, remove), largest=False).indices
        solve = torch.linalg.solve(a[j][:, j], torch.cat([beta[j], a[j]], 1))  # A_JJ⁻¹ [β_J, A_J:]
        beta -= a[:, j] @ solve[:, : beta.shape[1]]
        a -= a[:, j] @ solve[:, beta.shape[1]:]
        candidate[j] = False
        remove -= j.numel()
    kept = torch.cat([candidate[: m - fixed].nonzero().squeeze(1), torch.arange(m - fixed, m)])
    return kept[:keep], beta[kept]


@dataclass(frozen=True)
class ShrinkMLP(FxslicePass):
    """Delete the inner channels of every MLP that matter least to its output; refit the down projection."""

    ratio: float | None = None
    widths: Widths | None = field(default=None, compare=False)
    budget: float | None = None
    multiple_of: int = 8
    ridge: float = 1e-2
    strict: bool = False
    progress: bool = True
    name = "shrink_mlp"

    def __post_init__(self):
        if sum(x is not None for x in (self.ratio, self.widths, self.budget)) != 1:
            raise ValueError("shrink_mlp needs exactly one of ratio=… (e.g. shrink_mlp(0.25)), widths=… or budget=…")
        check_budget(self.budget)
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
            for mlp, k in zip(mlps, widths):
                for side in (*mlp.channel_sides, mlp.down.input_side()):
                    narrow_axis(gm, side, k)
                write_width(mlp.literals, k)
        else:
            if self.budget is not None:
                widths = budget_widths(gm, mlps, self.budget, plan.parameters_before or unique_parameters(gm),
                                       self.multiple_of, skipped)
            else:
                widths = [self.width(i, m) for i, m in enumerate(mlps)]
            self._calibrate(gm, mlps, widths, context)
        prefix = plan.module_prefix
        details = {"mlps": [[m.name, m.width, k] for m, k in zip(mlps, widths)],
                   "modules": [mlp_module(m, prefix) for m in mlps],
                   "skipped": [f"{module_path(s.node, prefix)}: {s.reason}" for s in skipped]}
        return details, time.perf_counter() - start

    def _calibrate(self, gm: fx.GraphModule, mlps: list[MLP], widths: list[int], context: Context) -> None:
        from ..calibrate import sweep_inner

        def apply(index: int, statistics) -> None:
            mlp, keep = mlps[index], widths[index]
            if keep == mlp.width:
                return
            down = mlp.down
            side = down.input_side()
            weight = get_tensor(gm, down.weight)
            moved = torch.movedim(weight.detach(), side.axis, -1).to(torch.float64)  # [..., m]
            fixed = 0
            if mlp.groups is not None:  # experts: [E, ..., m]; each keeps its own channels
                # Computed once (rank 0 under torch.distributed): every process removes the same channels.
                kept, new = from_rank0(lambda: _prune_experts(statistics.h, moved, keep, self.ridge))
            else:
                w = moved.reshape(-1, mlp.width).T  # y = h W: m × n
                c = statistics.h
                if down.bias is not None:  # a constant channel: the refit may move the bias
                    total = torch.as_tensor(float(statistics.tokens), dtype=torch.float64)
                    c = torch.cat([torch.cat([c, statistics.sum[:, None]], 1),
                                   torch.cat([statistics.sum, total[None]])[None, :]], 0)
                    w = torch.cat([w, w.new_zeros(1, w.shape[1])], 0)
                    fixed = 1
                kept, beta = from_rank0(lambda: prune_channels(c, w, keep, self.ridge, fixed))
                new = beta[:keep].T.reshape(*moved.shape[:-1], keep)
            for channel_side in mlp.channel_sides:
                select_axis(gm, channel_side, kept)
            write_width(mlp.literals, keep)
            set_tensor(gm, down.weight, torch.movedim(new, -1, side.axis).to(weight.dtype).contiguous())
            if fixed:
                bias = get_tensor(gm, down.bias)
                shift = beta[keep].reshape(bias.shape)
                set_tensor(gm, down.bias, (bias.detach().to(torch.float64) + shift).to(bias.dtype))

        sweep_inner(gm, list(context.calibration), [(m.inner, m.groups, tuple(u.node for u in m.ups)) for m in mlps],
                    apply, progress=self.progress)


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
    per_channel = []
    for mlp in mlps:  # parameters per inner channel (per channel of every expert: a 3-D weight's E rows)
        sides = (*mlp.channel_sides, mlp.down.input_side())
        per_channel.append(sum(tensor_meta(gm, side.target).numel() * side.blocks
                               // tensor_meta(gm, side.target).shape[side.axis] for side in dict.fromkeys(sides)))
    now, goal = unique_parameters(gm), budget * dense
    for step in range(1024, -1, -1):
        widths = [kept_width(step / 1024, m.width, multiple_of) for m in mlps]
        if now - sum((m.width - k) * n for m, k, n in zip(mlps, widths, per_channel)) <= goal:
            return widths
    reachable = (now - sum((m.width - k) * n for m, k, n in zip(mlps, widths, per_channel))) / dense
    if skipped:
        left = f"; {len(skipped)} MLP-like candidates were left alone, e.g. {skipped[0]}"
    elif not mlps:
        left = ("; an MLP is a linear fed by other linears through pointwise ops only (a fused projection split "
                "into equal pieces, and experts applied by a grouped matmul, count too)")
    else:
        left = ""
    raise UnsupportedGraphError(f"a budget of {budget} of the dense parameters cannot be met by shrinking the "
                                f"{len(mlps)} MLPs found (at most down to {reachable:.3f}){left}: the residual stream "
                                "and attention stay whole; choose a larger budget or add slice(ratio) before")


def shrink_mlp(ratio: float | None = None, *, widths: Widths | None = None, budget: float | None = None,
               multiple_of: int = 8, ridge: float = 1e-2) -> ShrinkMLP:
    """``shrink_mlp(0.25)``: the ``ShrinkMLP`` pass."""
    return ShrinkMLP(ratio=ratio, widths=widths, budget=budget, multiple_of=multiple_of, ridge=ridge)
