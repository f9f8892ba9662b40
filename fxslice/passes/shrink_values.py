"""shrink_values: narrow every attention's value heads and the output projection's rows that read them.

For one key/value group (``fxslice.analysis.attention``) the attention output reaching the output
projection is ``Σ_h A_h V O_h`` over the group's query heads ``h``, with ``V = x W_v`` (``d_h`` columns)
and ``O_h`` the ``d_h`` rows of the output projection that read head ``h``. Any invertible ``M`` gives
the same output with ``V M`` and ``M⁻¹ O_h``. With ``C = Σ VᵀV`` over the calibration tokens (damped by
``ridge`` times the mean of its diagonal, only so that its inverse root exists) and ``O = [O_h …]`` the group's rows side by side, ``M = C^{-1/2}
U`` where ``C^{1/2} O = U S Wᵀ`` (an SVD) makes the columns of ``V M`` carry the output's energy in
decreasing order, ``S²``, for tokens like the calibration's: keeping the first ``r`` deletes the least
(MoDeGPT's value/output compression, with the attention weights left out of the measure). At ``r = d_h``
nothing changes: ``C^{-1/2} U Uᵀ C^{1/2} = I``; values that span only ``r`` directions lose nothing at
``r`` (up to the damping).

``shrink_values(0.5)`` keeps ``(1 − 0.5)·d_h`` channels per group rounded down to ``multiple_of``.
Every view, expand and reshape on the way and the decoding graph's value cache narrow with them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.attention import ValuePath, find_value_paths, value_module
from ..distributed import from_rank0
from ..errors import UnsupportedGraphError, module_path
from ..graph import get_tensor, set_tensor
from ..plan import Plan
from ..rewrite import narrow_axis, write_width
from .base import Context, FxslicePass, kept_width, recorded

__all__ = ["ShrinkValues", "shrink_values", "value_transform"]


def value_transform(c: torch.Tensor, o: torch.Tensor, keep: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, M⁺)``: ``d_h × keep`` and ``keep × d_h`` with ``V M`` the kept values and ``M⁺ O_h`` the rows
    that read them (see the module docstring). ``c``: ``Σ VᵀV`` (float64, ``d_h × d_h``); ``o``: the
    group's output rows side by side (``d_h × n``)."""
    damp = ridge * float(c.diagonal().mean()) or ridge
    values, vectors = torch.linalg.eigh(c + damp * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))
    root = vectors @ torch.diag(values.sqrt()) @ vectors.T
    inverse_root = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    u, _, _ = torch.linalg.svd(root @ o, full_matrices=False)
    u = u[:, :keep]
    return inverse_root @ u, u.T @ root


@dataclass(frozen=True)
class ShrinkValues(FxslicePass):
    """Narrow every attention's value heads where the output keeps the least; the output rows follow."""

    ratio: float = 0.5
    multiple_of: int = 8
    ridge: float = 1e-6
    strict: bool = False
    progress: bool = True
    name = "shrink_values"

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"shrink_values ratio must be a number in [0, 1): the fraction of each value head's "
                             f"channels to delete; got {self.ratio!r}")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive integer; got {self.multiple_of!r}")
        if not isinstance(self.ridge, (int, float)) or not self.ridge > 0:
            raise ValueError(f"ridge must be a positive number; got {self.ridge!r}")

    def needs_calibration(self) -> str | None:
        return "shrink_values chooses the value channels from activations"

    def run(self, gm: fx.GraphModule, plan: Plan, context: Context) -> Plan:
        start = time.perf_counter()
        paths, skipped = find_value_paths(gm)
        if self.strict and skipped:
            raise UnsupportedGraphError("shrink_values: " + " | ".join(str(s) for s in skipped))
        if context.replay is not None:
            kept = recorded(context, self.name, "values", [p.name for p in paths], "value projections")
            widths = [kept[p.name] for p in paths]
            for path, keep in zip(paths, widths):
                for side in (*path.value_sides(), path.output_side()):
                    narrow_axis(gm, side, keep)
                _narrow_shapes(gm, path, keep)
        else:
            widths = [path.width if self.ratio == 0 else kept_width(1.0 - self.ratio, path.width, self.multiple_of)
                      for path in paths]
            self._calibrate(gm, paths, widths, context)
        prefix = plan.module_prefix
        details = {"values": [[p.name, p.width, k] for p, k in zip(paths, widths)],
                   "modules": [value_module(p, prefix) for p in paths],
                   "skipped": [f"{module_path(s.node, prefix)}: {s.reason}" for s in skipped]}
        return plan.with_pass(self.spec(), details={self.name: details},
                              timings={f"{self.name}_s": time.perf_counter() - start})

    def _calibrate(self, gm: fx.GraphModule, paths: list[ValuePath], widths: list[int], context: Context) -> None:
        from ..calibrate import sweep_inner

        def apply(index: int, statistics) -> None:
            path, keep = paths[index], widths[index]
            if keep == path.width:
                return
            d, heads = path.width, path.heads
            value = get_tensor(gm, path.value.weight)
            output = get_tensor(gm, path.output.weight)
            w_v = torch.movedim(value.detach(), path.value.out_axis, 0).to(torch.float64)  # [groups·d, in]
            w_o = torch.movedim(output.detach(), path.output.in_axis, 0).to(torch.float64)  # [heads·d, out]
            bias = get_tensor(gm, path.value.bias).detach().to(torch.float64) if path.value.bias else None

            def transforms():
                new_v, new_o, new_b = [], [None] * heads, []
                for g in range(path.groups):
                    rows = slice(g * d, (g + 1) * d)
                    mine = [h for h in range(heads) if path.group_of_head[h] == g]
                    o = torch.cat([w_o[h * d:(h + 1) * d] for h in mine], 1)
                    m, m_plus = value_transform(statistics.h[rows, rows], o, keep, self.ridge)
                    new_v.append(m.T @ w_v[rows])  # (x W_v) M: the kept values
                    new_b += [m.T @ bias[rows]] if bias is not None else []
                    for h in mine:
                        new_o[h] = m_plus @ w_o[h * d:(h + 1) * d]  # (V M)(M⁺ O_h) ≈ V O_h
                return torch.cat(new_v), torch.cat(new_o), (torch.cat(new_b) if new_b else None)

            new_v, new_o, new_b = from_rank0(transforms)
            set_tensor(gm, path.value.weight, torch.movedim(new_v, 0, path.value.out_axis).to(value.dtype).contiguous())
            set_tensor(gm, path.output.weight, torch.movedim(new_o, 0, path.output.in_axis).to(output.dtype).contiguous())
            if new_b is not None:
                set_tensor(gm, path.value.bias, new_b.to(get_tensor(gm, path.value.bias).dtype))
            _narrow_shapes(gm, path, keep)

        sweep_inner(gm, list(context.calibration), [(p.value.node, None, (p.value.node,)) for p in paths], apply,
                    progress=self.progress, desc="fxslice: shrinking value heads", unit="attention")


def _narrow_shapes(gm: fx.GraphModule, path: ValuePath, keep: int) -> None:
    """Write the new value width into the graph: views, expands and reshapes, and the value caches."""
    write_width(path.literals, keep)
    write_width(path.merged, path.heads * keep)
    for target in path.caches:
        cache = get_tensor(gm, target)
        set_tensor(gm, target, cache.new_zeros(*cache.shape[:-1], keep))


def shrink_values(ratio: float = 0.5, *, multiple_of: int = 8, ridge: float = 1e-6) -> ShrinkValues:
    """``shrink_values(0.5)``: the ``ShrinkValues`` pass."""
    return ShrinkValues(ratio=ratio, multiple_of=multiple_of, ridge=ridge)
