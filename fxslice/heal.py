"""Healing: train a compressed model to predict what the dense model predicts (knowledge distillation).

``fxslice.heal(compressed, teacher=dense, data=batches, steps=N)`` minimises, per real token,

    T² · KL(softmax(t / T) ‖ softmax(s / T))  +  lm_weight · CE(s, next token)

where ``t`` are the teacher's logits and ``s`` the compressed model's. The graph ``compile`` produced is
trained as it is, through ``torch.func.functional_call``: nothing about its structure, plan, widths or
parameter count changes, only weight values, so ``save`` / ``load``, ``generate`` and the KV-cache decoder
work on the result as on any compressed model. Two ways to train:

* every floating parameter (the default), inserted skip and bridge matrices included;
* low-rank adapters (``lora_rank=r``): every parameter that a linear map reads (``aten.linear``, ``addmm``,
  ``mm``, ``matmul``: the ops ``fxslice.analysis.ops`` knows, inserted matrices and a tied head included)
  is trained as ``W + (α/r)·B A`` with ``B = 0`` at the start, and ``B A`` is added into ``W`` at the end.
  peft's LoRA layers wrap ``nn.Linear`` modules; the captured graph has none (its linears are ATen calls
  on parameters), so the adapters are written here, on the parameters themselves.

Master weights (what the optimiser updates) are kept in ``master_dtype`` (default: the model's dtype, at
least float32) and cast to the model's dtype for each forward, so a bfloat16 model trains on float32
masters. A held-out validation loss is measured
before training and every ``eval_every`` steps; the weights of the best evaluation are returned and
training stops after ``patience`` evaluations without improvement. With ``state_dir`` the whole state
(masters, optimiser, best weights, history) is written atomically after every evaluation, and a later call
with the same options and data continues from it, giving the same result as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import optree
import torch
import torch.fx as fx
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .analysis.ops import weight_use
from .calibrate import Batch, batch_tokens, check_calibration
from .errors import CalibrationError, UnsupportedGraphError
from .graph import copy_graph, is_diagonal, logits_of, set_tensor
from .memory import GiB, value_bytes
from .model import SlicedCausalLM, graph_module
from .plan import plan_of, set_plan
from .streaming import materialize

__all__ = ["STATE_FILE", "TeacherLogits", "distillation_loss", "heal", "memory_estimate"]

STATE_FILE = "heal_state.pt"
"""The resumable state ``heal(..., state_dir=DIR)`` writes in ``DIR`` (read back with ``weights_only``)."""


@dataclasses.dataclass(frozen=True)
class _Options:
    steps: int
    lr: float
    eval_every: int
    patience: int | None
    lora_rank: int | None
    lora_alpha: float | None
    lm_weight: float
    temperature: float
    warmup: int
    weight_decay: float
    accumulate: int
    master_dtype: str | None
    autocast: str | None
    seed: int

    def check(self) -> None:
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"heal: {name} must be a positive integer; got {value!r}")

        positive("steps", self.steps)
        positive("eval_every", self.eval_every)
        positive("accumulate", self.accumulate)
        positive("patience", self.patience, allow_none=True)
        positive("lora_rank", self.lora_rank, allow_none=True)
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"heal: {name} must be positive; got {getattr(self, name)!r}")
        for name in ("lm_weight", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"heal: {name} must be zero or positive; got {getattr(self, name)!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise ValueError(f"heal: warmup must be an integer in [0, steps); got {self.warmup!r}")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError("heal: lora_alpha is an adapter option; give lora_rank too")
        if self.master_dtype not in (None, "float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"heal: master_dtype must be a floating dtype; got {self.master_dtype!r}")
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"heal: autocast must be torch.bfloat16 or torch.float16; got {self.autocast!r}")


class _Trainable:
    """The weights being trained: full masters per (tied) parameter, or frozen weights plus adapters."""

    def __init__(self, gm: fx.GraphModule, lora_rank: int | None, lora_alpha: float | None,
                 master_dtype: torch.dtype | None, seed: int):
        groups: dict[int, list[str]] = {}
        owners: dict[int, torch.Tensor] = {}
        for name, p in gm.named_parameters(remove_duplicate=False):
            if p.is_floating_point():
                groups.setdefault(id(p), []).append(name)
                owners[id(p)] = p
        self.names = {names[0]: names for names in groups.values()}  # one master per tied group
        self.frozen = {names[0]: owners[key].detach() for key, names in groups.items()}
        self.dtype = {key: t.dtype for key, t in self.frozen.items()}
        # Masters: the chosen dtype, or the model's own but at least float32 (a bfloat16 model trains on
        # float32 masters; a float64 one keeps float64).
        self.master = {key: master_dtype or torch.promote_types(t.dtype, torch.float32) for key, t in self.frozen.items()}
        self.lora = lora_rank is not None
        self.layout: dict[str, int] = {}  # adapter target -> its weight's output axis
        self.tensors: dict[str, torch.Tensor] = {}
        # A diagonal matrix (fuse_norm's bridge, diag(γ), in front of a tied head) trains as its diagonal
        # and stays diagonal: the healed model keeps the structure compression gave it (export --format hf
        # folds a diagonal bridge back into the norm and keeps the head tied).
        self.diagonal = {key for key, t in self.frozen.items() if is_diagonal(t)}
        for key in sorted(self.diagonal):
            self.tensors[key] = torch.diagonal(self.frozen[key]).to(self.master[key]).clone().requires_grad_(True)
        if not self.lora:
            for key, weight in self.frozen.items():
                if key not in self.diagonal:
                    self.tensors[key] = weight.to(self.master[key]).clone().requires_grad_(True)
            return
        self.scale = (lora_alpha if lora_alpha is not None else lora_rank) / lora_rank
        canonical = {name: names[0] for names in groups.values() for name in names}
        for node in gm.graph.nodes:
            use = weight_use(node)
            if use is None or use.in_axis is None or use.weight not in canonical:
                continue
            key = canonical[use.weight]
            if self.frozen[key].dim() == 2 and key not in self.layout and key not in self.diagonal:
                self.layout[key] = use.out_axis
        generator = torch.Generator().manual_seed(seed)
        for key in sorted(self.layout):
            shape = self.frozen[key].shape
            out, inp = shape[self.layout[key]], shape[1 - self.layout[key]]
            rank = min(lora_rank, out, inp)
            # A like nn.Linear's default init (kaiming-uniform, a=√5), B zero: training starts at W.
            bound = 1.0 / math.sqrt(inp)
            a = (torch.rand(rank, inp, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            device = self.frozen[key].device
            self.tensors[f"{key}::lora_A"] = a.to(device, self.master[key]).requires_grad_(True)
            b = torch.zeros(out, rank, dtype=self.master[key], device=device)
            self.tensors[f"{key}::lora_B"] = b.requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.tensors[k] for k in sorted(self.tensors)]

    def weight(self, key: str) -> torch.Tensor:
        """The weight the model computes with, in its own dtype (differentiable in the masters)."""
        if key in self.diagonal:
            return torch.diag(self.tensors[key].to(self.dtype[key]))
        if not self.lora:
            return self.tensors[key].to(self.dtype[key])
        if key not in self.layout:
            return self.frozen[key]
        delta = self.scale * (self.tensors[f"{key}::lora_B"] @ self.tensors[f"{key}::lora_A"])  # [out, in]
        delta = delta if self.layout[key] == 0 else delta.T
        return self.frozen[key] + delta.to(self.dtype[key])  # W stays as it was; only B A is trained

    def weights(self) -> dict[str, torch.Tensor]:
        keys = [*self.layout, *self.diagonal] if self.lora else self.names
        return {name: w for key in keys for w in (self.weight(key),) for name in self.names[key]}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: t.detach().clone() for k, t in self.tensors.items()}

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, t in self.tensors.items():
                t.copy_(tensors[k])

    @property
    def count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _logits(output: Any) -> torch.Tensor:
    logits = logits_of(output)
    if logits is not None:
        return logits
    raise UnsupportedGraphError(f"heal needs logits from the model; its output is a {type(output).__name__} "
                                "holding no floating tensor")


def _mask(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    mask = batch[1].get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:-1]:
        return mask.to(logits.device).bool()
    return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
                      lm_weight: float, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Sum over real tokens of ``T²·KL(teacher ‖ student)`` (+ ``lm_weight`` · next-token CE), and their count."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    loss = temperature ** 2 * kl[mask].sum()
    if lm_weight and input_ids is not None:
        keep = mask[:, 1:] & mask[:, :-1]
        ce = F.cross_entropy(student[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
        loss = loss + lm_weight * ce[keep.flatten()].sum() * (mask.sum() / keep.sum().clamp(min=1))
    return loss, int(mask.sum())


def _digest(batches: list[Batch]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for leaf in optree.tree_leaves(batch):
            if isinstance(leaf, torch.Tensor):
                digest.update(f"{tuple(leaf.shape)}{leaf.dtype}".encode())
                digest.update(leaf.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def memory_estimate(gm: fx.GraphModule, teacher: Any, batch: Batch, trainable: int, master_bytes: int) -> dict[str, float]:
    """Bytes heal needs, by kind: both models' weights, the optimiser (masters, gradients, two Adam moments)
    and the activations of one batch (every floating value the graph computes, kept for the backward pass,
    plus the loss's logit-sized temporaries)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in gm.parameters()}.values())
    if isinstance(teacher, torch.nn.Module):
        weights += sum(p.numel() * p.element_size() for p in {id(p): p for p in teacher.parameters()}.values())
    sizes = value_bytes(gm, *batch)
    activations = sum(size for node, size in sizes.items() if node.op == "call_function")
    outputs = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes
    logits = next((sizes[n] for n in outputs if sizes.get(n)), 0)
    activations += 4 * logits  # both log-softmaxes, the KL terms and the logits' gradient
    return {"weights": weights, "optimizer": trainable * (3 * master_bytes + 4), "activations": activations}


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def heal(
    compressed: torch.nn.Module,
    teacher: Callable[..., Any],
    data: Any,
    steps: int = 100,
    *,
    lr: float = 5e-5,
    validation: Any = None,
    eval_every: int = 10,
    patience: int | None = None,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lm_weight: float = 0.0,
    temperature: float = 1.0,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    accumulate: int = 1,
    master_dtype: torch.dtype | None = None,
    autocast: torch.dtype | None = None,
    seed: int = 0,
    state_dir: str | os.PathLike | None = None,
    teacher_cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """Train a copy of ``compressed`` (what ``fxslice.compile`` or ``load`` returned) to match ``teacher``.

    ``teacher``: the dense model (or any callable taking the same inputs and returning logits).
    ``data``: training batches, in any form ``compile``'s ``calibration`` accepts; one optimiser step
    reads ``accumulate`` of them, in an order drawn from ``seed`` afresh every pass over the data.
    ``validation``: held-out batches for the validation loss (default: the last tenth of ``data``, which
    is then not trained on; none when ``data`` is a single batch). ``lr`` warms up linearly over
    ``warmup`` steps (default a tenth of ``steps``) and decays linearly to zero at ``steps``; AdamW with
    betas (0.9, 0.95). ``lora_rank``: train adapters of that rank instead of every weight (``lora_alpha``
    defaults to the rank). ``teacher_cache``: a directory where the teacher's logits are kept (float16, one
    file per batch) so later passes over the data, resumed runs and other runs on the same data skip the
    teacher. ``autocast``: run both models' forward and the backward pass under ``torch.autocast`` in that
    dtype (matrix products in bfloat16 or float16, norms and the loss in float32; the masters and the
    result keep their dtype): faster where the hardware multiplies in that dtype (AVX512-BF16 / AMX CPUs, GPUs).
    Returns the model of the best validation loss; ``compressed`` is not modified.
    The loss history is in the result's ``heal_history``.
    """
    options = _Options(steps, float(lr), eval_every, patience, lora_rank, lora_alpha, float(lm_weight),
                       float(temperature), steps // 10 if warmup is None else warmup, float(weight_decay), accumulate,
                       str(master_dtype).removeprefix("torch.") if master_dtype else None,
                       str(autocast).removeprefix("torch.") if autocast else None, seed)
    options.check()
    gm = materialize(graph_module(compressed))  # a streamed model trains with its weights in memory
    plan = plan_of(gm)
    hf = plan.kind == "causal_lm"
    batches = list(check_calibration(data, None if hf else gm, hf=hf))
    if validation is not None:
        held_out = list(check_calibration(validation, None if hf else gm, hf=hf))
    else:
        cut = len(batches) - max(1, len(batches) // 10) if len(batches) > 1 else len(batches)
        batches, held_out = batches[:cut], batches[cut:]
    device = next(gm.parameters()).device
    probe = _check_models(gm, teacher, batches + held_out, device)
    teacher_logits = TeacherLogits(teacher, teacher_cache, probe, batches + held_out, options.autocast)

    work = copy_graph(gm)
    trainable = _Trainable(work, lora_rank, lora_alpha, master_dtype, seed)
    if not trainable.tensors:
        raise UnsupportedGraphError("heal found nothing to train: the model has no floating parameters"
                                    + (" read by a linear map (use full training: lora_rank=None)" if lora_rank else ""))
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=options.lr, betas=(0.9, 0.95),
                                  weight_decay=options.weight_decay)
    teacher_mode = teacher.training if isinstance(teacher, torch.nn.Module) else None
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()

    def mixed():
        return torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    def loss_of(batch: Batch, grad: bool) -> tuple[torch.Tensor, int]:
        args, kwargs = optree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch,
                                       none_is_leaf=True)
        with mixed():
            target = teacher_logits(batch, args, kwargs)
        with torch.set_grad_enabled(grad), mixed():
            student = _logits(torch.func.functional_call(work, trainable.weights(), args, kwargs))
            return distillation_loss(student, target, _mask((args, kwargs), student), options.temperature,
                                     options.lm_weight, kwargs.get("input_ids") if hf else None)

    def validate() -> float | None:
        if not held_out:
            return None
        total, count = 0.0, 0
        for batch in held_out:
            loss, n = loss_of(batch, grad=False)
            total, count = total + loss.item(), count + n
        return total / max(count, 1)

    def order(index: int) -> Batch:
        epoch, position = divmod(index, len(batches))
        permutation = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed + epoch))
        return batches[int(permutation[position])]

    def rate(step: int) -> float:
        if step < options.warmup:
            return (step + 1) / (options.warmup + 1)
        return max(0.0, (options.steps - step) / (options.steps - options.warmup))

    fingerprint = {"options": dataclasses.asdict(options), "data": _digest(batches), "validation": _digest(held_out),
                   "trained": sorted(trainable.tensors)}
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    state = _read_state(state_path, fingerprint)
    if state is not None:
        trainable.restore(state["tensors"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, best = state["step"], state["history"], state["best"]
    else:
        step, history = 0, []
        first = validate()
        best = {"step": 0, "loss": first, "tensors": trainable.snapshot()}
        history.append({"step": 0, "validation": first})
    bad = sum(1 for h in history if h.get("validation") is not None and best["loss"] is not None
              and h["step"] > best["step"])

    estimate = memory_estimate(work, teacher, max(batches, key=batch_tokens), trainable.count,
                               torch.finfo(master_dtype or torch.float32).bits // 8)
    parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in estimate.items())
    if progress:
        print(f"fxslice: healing {trainable.count / 1e6:.2f}M trained elements; estimated memory "
              f"{sum(estimate.values()) / GiB:.2f} GiB ({parts})", file=sys.stderr)
    started, tokens_seen, steps_run = time.perf_counter(), 0, 0
    bar = tqdm(total=options.steps, initial=step, desc="fxslice: healing", unit="step", disable=not progress)
    try:
        while step < options.steps and not (patience is not None and bad >= patience):
            for group in optimizer.param_groups:
                group["lr"] = options.lr * rate(step)
            optimizer.zero_grad(set_to_none=True)
            total, count = 0.0, 0
            for micro in range(options.accumulate):
                batch = order(step * options.accumulate + micro)
                loss, n = loss_of(batch, grad=True)
                loss.backward()
                total, count = total + loss.item(), count + n
                tokens_seen += batch_tokens(batch)
            for p in trainable.parameters():  # the gradient of the mean over the step's real tokens
                if p.grad is not None:
                    p.grad /= max(count, 1)
            optimizer.step()
            step += 1
            steps_run += 1
            elapsed = time.perf_counter() - started
            record = {"step": step, "train": total / max(count, 1)}
            if step % options.eval_every == 0 or step == options.steps:
                record["validation"] = validate()
                if record["validation"] is not None and record["validation"] < best["loss"]:
                    best, bad = {"step": step, "loss": record["validation"], "tensors": trainable.snapshot()}, 0
                elif record["validation"] is not None:
                    bad += 1
            history.append(record)
            bar.set_postfix(loss=f"{record['train']:.4f}", val=f"{best['loss']:.4f}" if best["loss"] is not None else "-",
                            tok_s=f"{tokens_seen / elapsed:.0f}", s_step=f"{elapsed / steps_run:.1f}")
            bar.update(1)
            if state_path is not None and "validation" in record:
                # The best weights are often these very weights: torch.save then stores them once.
                current = best["tensors"] if best["step"] == step else trainable.snapshot()
                _write_state(state_path, {"fingerprint": fingerprint, "step": step, "tensors": current,
                                          "optimizer": optimizer.state_dict(), "history": history, "best": best})
    finally:
        bar.close()
        if teacher_mode is not None:
            teacher.train(teacher_mode)
    seconds = time.perf_counter() - started
    if best["loss"] is not None:
        trainable.restore(best["tensors"])
    with torch.no_grad():
        for key, names in trainable.names.items():
            tensor = trainable.weight(key).detach().clone()
            for name in names:  # tied names keep sharing one tensor
                set_tensor(work, name, tensor)
    summary = {"heal_seconds": seconds, "heal_steps": float(steps_run), "heal_best_step": float(best["step"]),
               "heal_tokens_per_s": tokens_seen / seconds if seconds else 0.0,
               "heal_seconds_per_step": seconds / steps_run if steps_run else 0.0,
               "heal_peak_gib": _peak_bytes(device) / GiB, "heal_estimate_gib": sum(estimate.values()) / GiB}
    set_plan(work, dataclasses.replace(plan, timings={**plan.timings, **summary}))
    if progress:
        start = history[0].get("validation")
        print(f"fxslice: healed {steps_run} steps in {seconds:.0f} s ({summary['heal_seconds_per_step']:.1f} s/step, "
              f"{summary['heal_tokens_per_s']:.0f} tokens/s); best step {best['step']}"
              + (f", validation loss {start:.4f} -> {best['loss']:.4f}" if start is not None else "")
              + f"; peak memory {summary['heal_peak_gib']:.2f} GiB, estimate {summary['heal_estimate_gib']:.2f} GiB "
              f"({parts})", file=sys.stderr)
    healed = SlicedCausalLM(work, compressed.config) if isinstance(compressed, SlicedCausalLM) else work
    healed.heal_history = history
    return healed


class TeacherLogits:
    """The teacher's logits for a batch: computed each time, or (``directory``) computed once, stored as
    float16 (one safetensors file per batch, named by the sha256 of its inputs) and read back afterwards.
    Cached or not, the logits are the float16-rounded values, so a run that reads them from the cache
    trains exactly as one that computed them. ``teacher.json`` holds the sha256 of the teacher's logits on
    a probe input and the autocast dtype they were computed under (``None``: the teacher's own): a
    directory made by another teacher, or under another autocast, is refused."""

    def __init__(self, teacher: Callable[..., Any], directory: str | os.PathLike | None, probe: torch.Tensor,
                 batches: list[Batch], autocast: str | None = None):
        self.teacher, self.device = teacher, probe.device
        self.directory = Path(directory) if directory is not None else None
        if self.directory is None:
            return
        signature = hashlib.sha256(probe.to(torch.float16).cpu().numpy().tobytes()).hexdigest()
        manifest = self.directory / "teacher.json"
        recorded = json.loads(manifest.read_text()) if manifest.exists() else None
        if recorded is not None and recorded.get("teacher") != signature:
            raise UnsupportedGraphError(f"{self.directory} caches another teacher's logits ({manifest} differs); use "
                                        "another teacher_cache directory or delete this one")
        if recorded is not None and recorded.get("autocast") != autocast:
            raise UnsupportedGraphError(f"{self.directory} caches logits computed under autocast "
                                        f"{recorded.get('autocast')} ({manifest}) and this run uses {autocast}: use "
                                        "another teacher_cache directory, delete this one, or heal as that run did")
        missing = [b for b in batches if not self._path(b).exists()]
        needed = sum(batch_tokens(b) for b in missing) * probe.shape[-1] * 2
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if needed > free:
            raise UnsupportedGraphError(f"caching the teacher's logits in {self.directory} needs {needed / GiB:.1f} GiB "
                                        f"and {free / GiB:.1f} GiB is free: use fewer batches, another directory, or "
                                        "teacher_cache=None (logits computed on the fly)")
        manifest.write_text(json.dumps({"teacher": signature, "autocast": autocast}))

    def _path(self, batch: Batch) -> Path:
        return self.directory / f"{_digest([batch])[:40]}.safetensors"

    def __call__(self, batch: Batch, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.directory is not None and self._path(batch).exists():
            return load_file(self._path(batch))["logits"].to(self.device).float()
        with torch.no_grad():
            logits = _logits(self.teacher(*args, **kwargs))
        if self.directory is None:
            return logits
        rounded = logits.to(torch.float16)
        path = self._path(batch)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        save_file({"logits": rounded.cpu().contiguous()}, partial)
        os.replace(partial, path)
        return rounded.float()


def _check_models(gm: fx.GraphModule, teacher: Callable[..., Any], batches: list[Batch],
                  device: torch.device) -> torch.Tensor:
    """Refuse data and teachers that cannot work, before any weight changes: token ids outside the
    vocabulary, and a teacher whose logits do not have the compressed model's shape. Returns the
    teacher's logits on the first row of the first batch."""
    first_args, first_kwargs = optree.tree_map(lambda x: x[:1].to(device) if isinstance(x, torch.Tensor) and x.dim() else x,
                                               batches[0], none_is_leaf=True)
    if isinstance(first_kwargs.get("input_ids"), torch.Tensor):  # token 0 exists in every vocabulary
        first_kwargs["input_ids"] = torch.zeros_like(first_kwargs["input_ids"])
    with torch.no_grad():
        student = _logits(gm(*first_args, **first_kwargs))
        try:
            target = _logits(teacher(*first_args, **first_kwargs))
        except Exception as error:  # the teacher is the user's callable: say which call failed
            raise UnsupportedGraphError(f"the teacher ({type(teacher).__name__}) fails on the first batch: "
                                        f"{type(error).__name__}: {error}") from error
    if target.shape != student.shape:
        raise UnsupportedGraphError(f"the teacher's logits have shape {tuple(target.shape)} and the compressed "
                                    f"model's {tuple(student.shape)} on the first batch; heal needs the dense model "
                                    "the compressed one was made from (same vocabulary)")
    if not torch.isfinite(target).all():
        raise UnsupportedGraphError("the teacher's logits on the first batch are not finite")
    vocab = student.shape[-1]
    for index, (_, kwargs) in enumerate(batches):
        ids = kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise CalibrationError(f"batch {index} has token ids in [{int(ids.min())}, {int(ids.max())}]; the model's "
                                   f"vocabulary is [0, {vocab}): tokenize with the model's own tokenizer")
    return target


def _read_state(path: Path | None, fingerprint: dict) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise UnsupportedGraphError(f"{path} cannot be read as a healing state ({type(error).__name__}: {error}); "
                                    "delete it to start again") from error
    if state.get("fingerprint") != fingerprint:
        saved = state.get("fingerprint") or {}
        differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if "options" in differ:
            old, new = saved.get("options", {}), fingerprint["options"]
            differ = [f"options.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]
        raise UnsupportedGraphError(f"{path} holds a healing run with other settings ({', '.join(differ)}); pass the "
                                    "same data and options to resume it, or delete it (or use another state_dir) "
                                    "to start again")
    return state


def _write_state(path: Path, state: dict) -> None:
    """Write atomically: a run killed while saving leaves the previous state whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
