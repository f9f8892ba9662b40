"""Per-MLP widths under one budget, chosen from held-out losses, against every MLP keeping the same fraction.

    python benchmarks/mlp_allocation.py                          # dense, uniform, own, stream at 0.75
    python benchmarks/mlp_allocation.py --variants own_floor768  # 'own' with no MLP below 768 channels

SmolLM2-135M-Instruct, the reference stream: calibration on 64 × 512 tokens drawn from the first 80% of
the joined valid text, perplexity on the first 24 windows of 512 tokens of the remaining 20% (text the
calibration never saw; never the test windows). A pre-pass over the first 8 calibration sequences
measures, for every MLP, the greedy channel-removal path (``fxslice.passes.shrink_mlp.prune_channels``'s
update) fitted on the even sequences and scored on the odd ones and the other way round: the held-out
error ``‖h (W − β_k)‖²`` at every 64th width ``k``. The variants then remove 8 channels at a time from the
MLP whose loss after the removal is least (minimax), the loss divided by

* ``own``: the MLP's own output energy ``‖h W‖²`` (a relative error of the module);
* ``stream``: the energy of the residual stream after the layer;
* ``own_floorN``: as ``own``, no MLP below ``N`` channels;
* ``fisher``: multiplied by the mean squared gradient of the loss at the MLP's output (one backward pass
  of the dense model over the same 8 sequences), so the error is counted at what it costs downstream;
* ``fisherdiag``: each output dimension's error weighted by its own mean squared gradient;
* ``…_half``: each MLP halfway between that allocation's width and the uniform width;

and ``uniform`` is ``slice(budget=…)``'s rule (every MLP the same fraction); ``sensitivity`` is
``slice(budget=…, schedule="sensitivity")``, the library's form of ``fisher_half`` (its error curves
held out, on the dense model's first 4096 calibration tokens); ``joint`` is the same schedule after a
``rotate``, which lets it narrow the residual stream (one shared rotation) where that costs less. Reads SmolLM2's Hugging Face
modules through hooks (``model.model.layers[i].mlp.down_proj``): a measurement, not library code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import torch

from common import held_out_valid, load_smollm2, machine

GRID = 64
RIDGE = 1e-2


def held_out_path(c_fit: torch.Tensor, c_test: torch.Tensor, w: torch.Tensor,
                  fisher: torch.Tensor) -> dict[int, tuple[float, float]]:
    """``‖h (W − β_k)‖²`` over the held-out Gram ``c_test`` at widths ``m, m − 64, …, 64``, along the greedy
    removal path fitted on ``c_fit`` (8 channels at a time), and the same error with each output dimension
    ``j`` weighted by ``fisher[j]``, the loss's mean squared gradient there: ``Σ_j F_j (Dᵀ C D)_jj``."""
    m = w.shape[0]
    damp = RIDGE * float(c_fit.diagonal().mean())
    a = torch.cholesky_inverse(torch.linalg.cholesky(c_fit + damp * torch.eye(m, dtype=c_fit.dtype)))
    beta, alive, out, k = w.clone(), torch.ones(m, dtype=torch.bool), {m: (0.0, 0.0)}, m
    while k > GRID:
        cost = (beta * beta).sum(1) / a.diagonal()
        cost[~alive] = math.inf
        j = torch.topk(cost, 8, largest=False).indices
        solve = torch.linalg.solve(a[j][:, j], torch.cat([beta[j], a[j]], 1))
        beta -= a[:, j] @ solve[:, : beta.shape[1]]
        a -= a[:, j] @ solve[:, beta.shape[1]:]
        alive[j] = False
        beta[~alive] = 0.0
        k -= 8
        if k % GRID == 0:
            d = w - beta
            per_output = ((c_test @ d) * d).sum(0)
            out[k] = (float(per_output.sum()), float(per_output @ fisher))
    return out


def output_fisher(model, pre: dict) -> list[torch.Tensor]:
    """Per MLP, the mean over tokens of the squared gradient of the next-token loss (summed over the
    sequence) with respect to each dimension of the MLP's output: one backward pass of the dense model."""
    layers = model.model.layers
    fisher = [torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def down_hook(module, args, out, i=i):
            def grad_hook(g, i=i):
                fisher[i] += (g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0)
            out.register_hook(grad_hook)

        hooks.append(layer.mlp.down_proj.register_forward_hook(down_hook))
    # the weights stay frozen; the embedding's output asks for gradients so the stream's are computed
    hooks.append(model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_()))
    ids = pre["input_ids"]
    for p in model.parameters():
        p.requires_grad_(False)
    for s in range(ids.shape[0]):
        with torch.enable_grad():
            logits = model(input_ids=ids[s:s + 1]).logits[0, :-1].float()
            torch.nn.functional.cross_entropy(logits, ids[s, 1:], reduction="sum").backward()
    for hook in hooks:
        hook.remove()
    return [f / ids.numel() for f in fisher]


def measure_curves(model, pre: dict) -> list[dict]:
    from fxslice.calibrate import gram

    layers = model.model.layers
    grams = [[0.0, 0.0] for _ in layers]  # per fold Σ hᵀh of the down projection's input
    energy = [0.0 for _ in layers]  # Σ ‖x‖² of the stream after the layer
    fold = torch.arange(pre["input_ids"].shape[0]) % 2
    hooks = []
    for i, layer in enumerate(layers):
        def down_hook(module, args, i=i):
            h = args[0].detach().double()
            for f in (0, 1):
                grams[i][f] = grams[i][f] + gram(h[fold == f].reshape(-1, h.shape[-1]))

        def layer_hook(module, args, out, i=i):
            x = (out[0] if isinstance(out, tuple) else out).detach().double()
            energy[i] += float((x ** 2).sum())

        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook))
        hooks.append(layer.register_forward_hook(layer_hook))
    with torch.no_grad():
        model(**pre)
    for hook in hooks:
        hook.remove()
    fisher = output_fisher(model, pre)
    curves = []
    for i, layer in enumerate(layers):
        w = layer.mlp.down_proj.weight.detach().double().T  # m × n (y = h W)
        errors: dict[int, float] = {}
        weighted: dict[int, float] = {}
        for f in (0, 1):
            for k, (v, u) in held_out_path(grams[i][1 - f], grams[i][f], w, fisher[i]).items():
                errors[k] = errors.get(k, 0.0) + v
                weighted[k] = weighted.get(k, 0.0) + u
        own = sum(float(((grams[i][f] @ w) * w).sum()) for f in (0, 1))
        curves.append({"errors": errors, "fisherdiag": weighted, "own": own, "stream": energy[i],
                       "fisher": float(fisher[i].mean()), "one": 1.0})
    return curves


def allocate(curves: list[dict], width: int, remove: int, norm: str, floor: int = GRID) -> list[int]:
    def loss(i: int, k: int) -> float:
        e = curves[i]["fisherdiag" if norm == "fisherdiag" else "errors"]
        lo, hi = max(x for x in e if x <= k), min(x for x in e if x >= k)
        v = e[lo] if lo == hi else e[lo] + (e[hi] - e[lo]) * (k - lo) / (hi - lo)
        if norm == "fisher":
            return v * curves[i]["fisher"]
        return v / curves[i]["one" if norm == "fisherdiag" else norm]

    widths = [width] * len(curves)
    while remove > 0:
        _, i = min((loss(i, widths[i] - 8), i) for i in range(len(curves)) if widths[i] - 8 >= floor)
        widths[i] -= 8
        remove -= 8
    return widths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--variants", nargs="+", default=["dense", "uniform", "own", "stream"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import fxslice
    from fxslice import fuse_norm, rotate, shrink_mlp, slice
    from fxslice.plan import plan_of
    from fxslice.eval import perplexity

    model, tokenizer = load_smollm2()
    calibration, held = held_out_valid(tokenizer)
    print(f"<!-- {machine()}, command: python benchmarks/mlp_allocation.py "
          f"--budget {args.budget} --variants {' '.join(args.variants)} -->")
    curves = None
    dense = sum(p.numel() for p in model.parameters())
    width, per_channel = model.config.intermediate_size, 3 * model.config.hidden_size
    for variant in args.variants:
        row = {"variant": variant}
        if variant == "dense":
            row["held_out_perplexity"] = perplexity(model, tokenizer, held, 512, max_windows=24)
            print(json.dumps(row), flush=True)
            continue
        if variant == "uniform":
            passes = [fuse_norm, slice(budget=args.budget)]
        elif variant == "sensitivity":  # the library's schedule: held-out curves, Fisher weights, halfway
            passes = [fuse_norm, slice(budget=args.budget, schedule="sensitivity")]
        elif variant == "joint":  # the same, the stream's width (one shared rotation) chosen with the MLPs'
            passes = [fuse_norm, rotate, slice(budget=args.budget, schedule="sensitivity")]
        else:
            if curves is None:
                start = time.perf_counter()
                curves = measure_curves(model, calibration[0])
                print(f"held-out removal paths: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            base, half, _ = variant.partition("_half")
            norm, _, floor = base.partition("_floor")
            remove = math.ceil((dense - args.budget * dense) / per_channel / 8) * 8
            row["widths"] = allocate(curves, width, remove, norm, int(floor or GRID))
            if half:  # halfway between the allocation and the uniform fraction, the same total
                row["widths"] = [8 * round((w + width - remove / len(curves)) / 16) for w in row["widths"]]
            passes = [fuse_norm, shrink_mlp(widths=row["widths"])]
        start = time.perf_counter()
        compressed = fxslice.compile(model, passes, calibration=calibration)
        row["compress_s"] = round(time.perf_counter() - start, 1)
        report = fxslice.report(compressed)
        if variant in ("sensitivity", "joint"):
            row["widths"] = [k for _, _, k in report["inner"]["mlps"]]
            row["stream"] = list(plan_of(compressed).widths) or None
        row["ratio"] = report["parameters"]["ratio"]
        row["held_out_perplexity"] = perplexity(compressed, tokenizer, held, 512, max_windows=24)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
