"""Saving and loading compressed models: safetensors weights plus a JSON recipe, never pickle.

A saved directory holds

* ``model.safetensors``: every tensor the graph reads (parameters, buffers, constants), by attribute path;
* ``fxslice.json``: format version, library versions, the graph's ``Plan`` (the passes with their
  options, per residual state its ``Q``'s origin and width), the dtypes of the tensors, a fingerprint
  of the rewritten graph and the sha256 of the weights file (``load`` checks it);
* for Hugging Face models, ``config.json`` (and the tokenizer's files when one is given).

``load`` rebuilds the original architecture from ``config.json`` with uninitialised weights, captures it,
replays the plan (``fxslice.replay``: no rotation is computed), checks the fingerprint and assigns the
saved tensors. No calibration data or PCA is needed and the logits are bitwise identical to the saved
model's.
"""

from __future__ import annotations

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

from .capture import HF_PREFIX, capture
from .distributed import on_rank0
from .errors import UnsupportedGraphError
from .graph import get_tensor, set_tensor, tensor_targets
from .loading import empty_causal_lm, match_buffer_dtypes
from .model import SlicedCausalLM, graph_module
from .plan import Plan, plan_of
from .replay import replay

__all__ = ["fingerprint", "load", "read_plan", "save", "sha256", "write_atomically"]

FORMAT = 2
RECIPE_FILE = "fxslice.json"
WEIGHTS_FILE = "model.safetensors"


def fingerprint(gm: fx.GraphModule) -> str:
    """sha256 of the generated code and of every tensor's name, shape and dtype."""
    digest = hashlib.sha256(gm.code.encode())
    for target in tensor_targets(gm):
        tensor = get_tensor(gm, target)
        digest.update(f"{target}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    return digest.hexdigest()


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
    tensors, aliases = {}, {}
    seen: dict[tuple, str] = {}
    for target in tensor_targets(gm):
        tensor = get_tensor(gm, target).detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[target] = seen[key]  # a tied weight is stored once
            continue
        seen[key] = target
        tensors[target] = tensor.to("cpu").contiguous()
    from . import __version__
    import transformers

    recipe = {
        "format": FORMAT,
        "versions": {"fxslice": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "plan": plan_of(gm).to_json(),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "aliases": aliases,
        "dtypes": {target: str(get_tensor(gm, target).dtype).removeprefix("torch.") for target in tensor_targets(gm)},
        "fingerprint": fingerprint(gm),
    }

    def write(staging: Path) -> None:
        # One metadata entry: safetensors writes its metadata map in hash order, so two entries could
        # come out in either order and the same weights would not give the same bytes (or sha256).
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        recipe["sha256"] = {WEIGHTS_FILE: sha256(staging / WEIGHTS_FILE)}
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))
        if isinstance(model, SlicedCausalLM):
            model.config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_atomically(directory, write)


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


def _rebuild_causal_lm(directory: Path, dtype: torch.dtype):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UnsupportedGraphError(f"{directory / 'config.json'} cannot be read: {error}") from error
    return empty_causal_lm(config, dtype), config


def load(directory: str | os.PathLike, model: torch.nn.Module | None = None, example_inputs: Any = None,
         verify: bool = True) -> torch.nn.Module:
    """Load a directory written by ``fxslice.save``.

    A Hugging Face causal LM is rebuilt from its ``config.json``. For any other module pass ``model``, an
    instance of the original architecture (its weights do not matter), and the ``example_inputs`` it was
    compiled with. The weights file must have the sha256 recorded when it was saved (``verify=False``
    skips reading it twice, for a file you trust).
    """
    directory = Path(directory)
    recipe = _read_recipe(directory)
    recorded = recipe.get("sha256", {}).get(WEIGHTS_FILE)
    if verify and recorded is not None and (directory / WEIGHTS_FILE).is_file():
        if sha256(directory / WEIGHTS_FILE) != recorded:
            raise UnsupportedGraphError(f"{directory / WEIGHTS_FILE} does not have the sha256 recorded in "
                                        f"{directory / RECIPE_FILE} when it was saved: the file was changed or "
                                        "corrupted; save the model again (fxslice.load(..., verify=False) loads it "
                                        "anyway)")
    plan: Plan = recipe["plan"]
    dtype = getattr(torch, recipe.get("dtype", "float32"))
    config = None
    if plan.kind == "causal_lm":
        model, config = _rebuild_causal_lm(directory, dtype)
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
    weights_path = directory / WEIGHTS_FILE
    try:
        tensors = load_file(weights_path)
    except (OSError, SafetensorError, ValueError) as error:
        raise UnsupportedGraphError(f"{weights_path} is missing or corrupted: {error}") from error
    for name in list(tensors):
        # safetensors hands out 8-byte aligned memory; BLAS takes other code paths (rounding differently)
        # than on the allocator's 64-byte aligned memory the saved model computed with: copy, one at a time.
        tensors[name] = tensors[name].clone()
    for target, source in recipe.get("aliases", {}).items():
        if source in tensors:
            tensors[target] = tensors[source]
    if fingerprint(gm) != recipe.get("fingerprint"):
        raise UnsupportedGraphError(
            f"the graph rebuilt from {directory} differs from the one saved (fingerprint mismatch); it was saved "
            f"with {recipe.get('versions')} — load it with those versions of torch and transformers"
        )
    expected = tensor_targets(gm)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UnsupportedGraphError(f"{weights_path} lacks {len(missing)} tensors the rebuilt graph needs, e.g. {missing[:3]}")
    for target in expected:
        old, new = get_tensor(gm, target), tensors[target]
        if tuple(old.shape) != tuple(new.shape):
            raise UnsupportedGraphError(f"{weights_path}: {target} has shape {tuple(new.shape)}, the rebuilt graph "
                                        f"needs {tuple(old.shape)}")
    shared: dict[str, torch.Tensor] = {}
    for target in expected:
        source = recipe.get("aliases", {}).get(target, target)
        shared.setdefault(source, tensors[target])
        set_tensor(gm, target, shared[source])
    return SlicedCausalLM(gm, config) if config is not None else gm

