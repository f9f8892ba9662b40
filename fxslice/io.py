"""Saving and loading compressed models: safetensors weights plus a JSON recipe, never pickle.

A saved directory holds

* ``model.safetensors``: every tensor the graph reads (parameters, buffers, constants), by attribute path
  (a streamed model's, ``fxslice.streaming``, larger than its store's budget or than 2 GiB: shards
  ``model-00001-of-0000N.safetensors`` … of at most that size);
* ``fxslice.json``: format version, library versions, the graph's ``Plan`` (the passes with their
  options, per residual state its ``Q``'s origin and width), the dtypes of the tensors, a fingerprint
  of the rewritten graph (and one of its tensors alone), the probe logits (``probe_logits``: for a
  rebuild on another device) and the sha256 of each weights file (``load`` checks them);
* for Hugging Face models, ``config.json`` (and the tokenizer's files when one is given).

``load`` rebuilds the original architecture from ``config.json`` with uninitialised weights, captures it,
replays the plan (``fxslice.replay``: no rotation is computed), checks the fingerprint and assigns the
saved tensors. No calibration data or PCA is needed and the logits are bitwise identical to the saved
model's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .capture import HF_PREFIX, capture, example_like
from .decode import logit_error
from .distributed import on_rank0
from .errors import UnsupportedGraphError
from .graph import STREAMED, get_tensor, graph_device, set_tensor, tensor_meta, tensor_targets
from .loading import empty_causal_lm, match_buffer_dtypes
from .model import SlicedCausalLM, graph_module
from .plan import Plan, plan_of
from .replay import replay

__all__ = ["fingerprint", "load", "read_plan", "save", "sha256", "write_atomically"]

FORMAT = 2
RECIPE_FILE = "fxslice.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_BYTES = 2 * 1024**3
"""Largest weights file a streamed model is saved in (its store's budget when that is smaller)."""


def fingerprint(gm: fx.GraphModule, device: str | torch.device | None = None, code: bool = True) -> str:
    """sha256 of the generated code and of every tensor's name, shape and dtype (``code=False``: of the
    tensors only). With ``device``, the code is read as if it named that device where it names its own (a
    graph rebuilt on another device than the one it was saved from)."""
    text = gm.code if code else ""
    if device is not None and torch.device(device) != graph_device(gm):
        text = text.replace(repr(graph_device(gm)), repr(torch.device(device)))
    digest = hashlib.sha256(text.encode())
    for target in tensor_targets(gm):
        tensor = tensor_meta(gm, target)
        digest.update(f"{target}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    return digest.hexdigest()


PROBE_POSITIONS, PROBE_LOGITS = 4, 16
"""A saved causal LM's probe: the first ``PROBE_LOGITS`` logits at its last ``PROBE_POSITIONS`` positions."""


def probe_logits(model: torch.nn.Module) -> torch.Tensor | None:
    """What ``model`` computes on fixed token ids (two rows at the capture's length), a corner of its
    logits in float64 on the CPU: how a graph rebuilt on another device is checked, where the model code
    may trace to other operations (``load``). None for a streamed graph (a forward would read every weight
    once more) and for modules other than a causal LM."""
    gm = graph_module(model)
    if not isinstance(model, SlicedCausalLM) or gm.meta.get(STREAMED) is not None:
        return None
    length = plan_of(gm).capture_length or 8
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 2) or 2)
    ids = torch.arange(2 * length).reshape(2, length) * 7919 % vocab  # fixed, spread over the vocabulary
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device)).logits
    return logits[:, -PROBE_POSITIONS:, :PROBE_LOGITS].to("cpu", torch.float64)


def save(model: torch.nn.Module, directory: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write ``model`` (as returned by ``fxslice.compile``) to ``directory``, atomically.

    Everything is written to a temporary directory beside the target and moved into place at the end,
    so a failure leaves no half-written directory. An existing directory is replaced only with
    ``overwrite=True``. Under ``torch.distributed`` only rank 0 writes; the others return when it is done.
    """
    # Every process holds the same model: rank 0 writes, the others wait (and see rank 0's error).
    directory = Path(directory)
    written = on_rank0(lambda: _save(graph_module(model), model, directory, tokenizer, overwrite), f"save {directory}")
    return directory if written is None else written


def _save(gm: fx.GraphModule, model: torch.nn.Module, directory: Path, tokenizer: Any, overwrite: bool) -> Path:
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    stored, aliases = [], {}
    seen: dict[tuple, str] = {}
    for target in tensor_targets(gm):
        tensor = tensor_meta(gm, target)
        key = (id(tensor),) if tensor.is_meta else (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                                                     tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[target] = seen[key]  # a tied weight is stored once
            continue
        seen[key] = target
        stored.append(target)
    store = gm.meta.get(STREAMED)
    shards = _shards(gm, stored, min(SHARD_BYTES, store.budget) if store is not None else None)
    from . import __version__
    import transformers

    recipe = {
        "format": FORMAT,
        "versions": {"fxslice": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "plan": plan_of(gm).to_json(),
        "dtype": str(next((d for d in (tensor_meta(gm, t).dtype for t in stored) if d.is_floating_point),
                          torch.float32)).removeprefix("torch."),  # an index buffer says nothing of it
        "aliases": aliases,
        "dtypes": {target: str(tensor_meta(gm, target).dtype).removeprefix("torch.") for target in tensor_targets(gm)},
        "fingerprint": fingerprint(gm),
        "tensors": fingerprint(gm, code=False),
        "device": str(graph_device(gm)),
    }
    probe = probe_logits(model)
    if probe is not None:
        recipe["probe"] = probe.tolist()

    def write(staging: Path) -> None:
        # One metadata entry: safetensors writes its metadata map in hash order, so two entries could
        # come out in either order and the same weights would not give the same bytes (or sha256).
        names = [WEIGHTS_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                         for i in range(len(shards))]
        for name, shard in zip(names, shards):
            # A shard at a time: a streamed model's weights are read from its store as they are written.
            tensors = {target: get_tensor(gm, target).detach().to("cpu").contiguous() for target in shard}
            save_file(tensors, staging / name, metadata={"format": "pt"})
            del tensors
        recipe["sha256"] = {name: sha256(staging / name) for name in names}
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
        if isinstance(model, SlicedCausalLM):
            config = copy.deepcopy(model.config)
            # As save_pretrained does: the class is recorded, so load rebuilds it even from a config
            # that transformers maps to no causal LM (the text config of a multimodal model).
            config.architectures = [plan_of(gm).class_name]
            config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_atomically(directory, write)


def _shards(gm: fx.GraphModule, targets: list[str], limit: int | None) -> list[list[str]]:
    """``targets`` in order, cut into runs of at most ``limit`` bytes (one run when ``limit`` is None)."""
    shards: list[list[str]] = [[]]
    size = 0
    for target in targets:
        tensor = tensor_meta(gm, target)
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(target)
        size += nbytes
    return shards


def write_atomically(directory: Path, write: Callable[[Path], Any]) -> Path:
    """``write(staging)`` into a fresh directory beside ``directory``, then move it into place (replacing
    what was there); on any failure the staging directory is removed and ``directory`` is untouched."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _read_recipe(directory: Path) -> dict:
    path = directory / RECIPE_FILE
    if not directory.is_dir():
        raise UnsupportedGraphError(f"{directory} is not a directory saved by fxslice.save")
    if not path.is_file():
        raise UnsupportedGraphError(f"{directory} is not an fxslice model: {path} is missing")
    try:
        recipe = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnsupportedGraphError(f"{path} is corrupted: {error}") from error
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise UnsupportedGraphError(f"{path} has format {recipe.get('format') if isinstance(recipe, dict) else '?'}; "
                                    f"this fxslice reads format {FORMAT}")
    try:
        recipe["plan"] = Plan.from_json(recipe["plan"])
    except (KeyError, TypeError, ValueError) as error:
        raise UnsupportedGraphError(f"{path} holds no readable plan ({type(error).__name__}: {error})") from error
    return recipe


def read_plan(directory: str | os.PathLike) -> Plan:
    """The plan recorded in a directory written by ``fxslice.save`` (the weights are not read)."""
    return _read_recipe(Path(directory))["plan"]


def _rebuild_causal_lm(directory: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UnsupportedGraphError(f"{directory / 'config.json'} cannot be read: {error}") from error
    return empty_causal_lm(config, dtype, device), config


def load(directory: str | os.PathLike, model: torch.nn.Module | None = None, example_inputs: Any = None,
         verify: bool = True, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load a directory written by ``fxslice.save``.

    A Hugging Face causal LM is rebuilt from its ``config.json`` on ``device`` (default the CPU), whatever
    device it was compressed on: the graph is captured again there. For any other module pass ``model``,
    an instance of the original architecture (its weights do not matter) on the device to run on, and the
    ``example_inputs`` it was compiled with. The weights files must have the sha256 recorded when they were
    saved (``verify=False`` skips reading them twice, for files you trust).
    """
    directory = Path(directory)
    recipe = _read_recipe(directory)
    files = sorted(recipe.get("sha256") or {WEIGHTS_FILE: None})
    for name in files:
        recorded = recipe.get("sha256", {}).get(name)
        if verify and recorded is not None and (directory / name).is_file() and sha256(directory / name) != recorded:
            raise UnsupportedGraphError(f"{directory / name} does not have the sha256 recorded in "
                                        f"{directory / RECIPE_FILE} when it was saved: the file was changed or "
                                        "corrupted; save the model again (fxslice.load(..., verify=False) loads it "
                                        "anyway)")
    plan: Plan = recipe["plan"]
    dtype = getattr(torch, recipe.get("dtype", "float32"))
    config = None
    if plan.kind == "causal_lm":
        model, config = _rebuild_causal_lm(directory, dtype, torch.device(device or "cpu"))
        if plan.capture_length is not None:  # the length it was captured at (a capture may be specialised to it)
            example_inputs = example_like(torch.zeros(2, plan.capture_length, dtype=torch.long))
        match_buffer_dtypes(model, {k: getattr(torch, v) for k, v in recipe.get("dtypes", {}).items()}, HF_PREFIX)
    elif model is None:
        raise UnsupportedGraphError(f"{directory} holds a compiled {plan.model_class}; pass model=<an "
                                    "instance of that class> and example_inputs=... to fxslice.load")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            gm = replay(capture(model, example_inputs), plan)
        except UnsupportedGraphError as error:
            source = directory / "config.json" if config is not None else f"the {type(model).__name__} passed in"
            raise UnsupportedGraphError(f"cannot rebuild the saved graph from {source}: {error}") from error
    tensors = {}
    for name in files:
        weights_path = directory / name
        try:
            shard = load_file(weights_path)
        except (OSError, SafetensorError, ValueError) as error:
            raise UnsupportedGraphError(f"{weights_path} is missing or corrupted: {error}") from error
        for key in list(shard):
            # safetensors hands out 8-byte aligned memory; BLAS takes other code paths (rounding differently)
            # than on the allocator's 64-byte aligned memory the saved model computed with: copy, one at a time.
            tensors[key] = shard.pop(key).clone()
    weights_path = directory / (files[0] if len(files) == 1 else "model-*.safetensors")
    for target, source in recipe.get("aliases", {}).items():
        if source in tensors:
            tensors[target] = tensors[source]
    saved_on = recipe.get("device", "cpu")
    moved = torch.device(saved_on) != graph_device(gm)
    elsewhere = (f"; it was compressed on {saved_on} and rebuilt on {graph_device(gm)}, where the model code may "
                 f"trace differently — load it on {saved_on}" if moved else "")
    mismatch = UnsupportedGraphError(
        f"the graph rebuilt from {directory} differs from the one saved (fingerprint mismatch); it was saved "
        f"with {recipe.get('versions')} — load it with those versions of torch and transformers{elsewhere}")
    # On another device the model code may trace to other operations for the same function (a kernel
    # chosen by device): then the weights must still fit by name, shape and dtype, and the rebuilt model
    # must compute the saved logits (checked below, once the weights are in).
    probe = None
    if fingerprint(gm, device=saved_on) != recipe.get("fingerprint"):
        if not (moved and recipe.get("probe") is not None and recipe.get("tensors") == fingerprint(gm, code=False)):
            raise mismatch
        probe = torch.tensor(recipe["probe"], dtype=torch.float64)
    expected = tensor_targets(gm)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UnsupportedGraphError(f"{weights_path} lacks {len(missing)} tensors the rebuilt graph needs, e.g. {missing[:3]}")
    for target in expected:
        old, new = tensor_meta(gm, target), tensors[target]
        if tuple(old.shape) != tuple(new.shape):
            raise UnsupportedGraphError(f"{weights_path}: {target} has shape {tuple(new.shape)}, the rebuilt graph "
                                        f"needs {tuple(old.shape)}")
    shared: dict[str, torch.Tensor] = {}
    to = graph_device(gm)
    for target in expected:
        source = recipe.get("aliases", {}).get(target, target)
        shared.setdefault(source, tensors[target].to(to))
        set_tensor(gm, target, shared[source])
    loaded = SlicedCausalLM(gm, config) if config is not None else gm
    if probe is not None:
        error, tolerance = logit_error(probe_logits(loaded), probe, dtype)
        if not error <= tolerance:
            raise UnsupportedGraphError(f"{mismatch}; its logits differ from the saved ones by {error:.2g} (relative)")
    return loaded

