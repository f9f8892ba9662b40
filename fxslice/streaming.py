"""Compressing a model larger than memory: weights streamed from its safetensors checkpoint.

``open_checkpoint(directory)`` builds the architecture with fake parameters (``FakeTensorMode``: shape,
dtype and device, no data; buffers such as rotary tables are computed as usual) and a ``WeightStore``
over the checkpoint's files. ``fxslice.compile`` captures that model as it captures any other — the
trace sees CPU tensors of the right shapes, so the graph is the one a loaded model gives — and
attaches the store to the graph: its parameters become meta placeholders, and
``fxslice.graph.get_tensor`` / ``set_tensor`` read and write the store. The passes and the calibration sweep reach the weights in graph order, so
the store holds only the ones in use: a tensor is read from the checkpoint when first needed, kept
while the budget allows (least recently used out first), and a rewritten one that must leave memory is
written to a spill directory and read back when needed again. ``fxslice.save`` then writes the weights
shard by shard. The operations are the ones the in-memory path runs, on the same values, so the result
is the same model.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import sys
import tempfile
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from .errors import UnsupportedGraphError
from .graph import STREAMED, owner_of, tensor_meta, tensor_targets
from .loading import causal_lm_from_config

__all__ = ["DEFAULT_BUDGET", "WeightStore", "attach", "is_checkpoint", "materialize", "open_checkpoint"]

DEFAULT_BUDGET = 2 * 1024**3
"""Bytes of weights a store keeps in memory unless told otherwise (``budget=``; CLI ``--stream-budget``)."""

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A Hugging Face directory whose weights are safetensors (one file or shards with their index)."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and ((path / _INDEX).is_file() or (path / _SINGLE).is_file())


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    if (directory / _INDEX).is_file():
        try:
            weight_map = json.loads((directory / _INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UnsupportedGraphError(f"{directory / _INDEX} is not a readable safetensors index: {error}") from error
        files = {name: directory / file for name, file in weight_map.items()}
    else:
        with safe_open(directory / _SINGLE, "pt") as handle:
            files = dict.fromkeys(handle.keys(), directory / _SINGLE)
    for path in set(files.values()):
        if not path.is_file():
            raise UnsupportedGraphError(f"{path} is named by {directory / _INDEX} but missing")
    return files


class WeightStore:
    """A streamed graph's weights, by graph target: read on first use from the checkpoint, held in memory
    up to ``budget`` bytes, rewritten ones spilled to ``spill`` when they must leave memory. Values are
    read in their placeholder's dtype onto ``device``.

    Each target points to a value (a key); tied weights point to one. ``put`` gives the target a new
    value (the same one as another target's when it is the same tensor object), as assigning a
    parameter does in memory.
    """

    def __init__(self, checkpoint: Path, device: torch.device | str = "cpu", budget: int = DEFAULT_BUDGET,
                 spill: str | os.PathLike | None = None):
        self.checkpoint = Path(checkpoint)
        self.files = _checkpoint_files(self.checkpoint)
        self.device = torch.device(device)
        self.budget = int(budget)
        _return_freed_memory()
        self._spill_root = Path(tempfile.mkdtemp(prefix="fxslice-spill-", dir=spill))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._spill_root, True)
        self.keys: dict[str, str] = {}  # target -> key
        self.placeholders: dict[str, torch.nn.Parameter] = {}  # key -> meta Parameter
        self.origin: dict[str, tuple[Path, str]] = {}  # key -> (file, tensor name) it can be read from
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # key -> values, least recent first
        self.dirty: set[str] = set()  # cached keys whose values exist nowhere else
        self.held = 0
        self.peak = 0  # most bytes held at once
        self.reads = 0
        self.spilled = 0
        self._evicted = 0  # bytes evicted since the heaps were last trimmed
        self._counter = itertools.count()

    # --- what the graph sees ---------------------------------------------------------------------

    def get(self, target: str) -> torch.Tensor:
        key = self.keys[target]
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        path, name = self.origin[key]
        tensor = self._read(path, name)
        placeholder = self.placeholders[key]
        if tuple(tensor.shape) != tuple(placeholder.shape):
            raise UnsupportedGraphError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the architecture in "
                                        f"{self.checkpoint / 'config.json'} needs {tuple(placeholder.shape)} "
                                        f"(graph target {target})")
        self.reads += 1
        self._hold(key, tensor.to(device=self.device, dtype=placeholder.dtype))
        return self.cache[key]

    def put(self, target: str, tensor: torch.Tensor) -> torch.nn.Parameter:
        """``target`` now holds ``tensor``; returns its placeholder (the graph registers that)."""
        tensor = tensor.detach()
        old = self.keys.get(target)
        same = next((k for k, v in self.cache.items() if v is tensor), None)
        if same is None:
            same = f"v{next(self._counter)}"
            self.placeholders[same] = _placeholder(tensor)
            self.dirty.add(same)
            self._hold(same, tensor)
        self.keys[target] = same
        if old is not None and old != same and old not in self.keys.values():
            self._forget(old)
        self._fit(keep=same)
        return self.placeholders[same]

    # --- setting up ------------------------------------------------------------------------------

    def adopt(self, gm: fx.GraphModule, prefix: str) -> None:
        """Take over ``gm``'s fake parameters, each replaced by a meta placeholder: target ``prefix + name``
        is checkpoint tensor ``name``; tied targets (one tensor) share one key and one placeholder. Raises,
        naming the weights, when the checkpoint lacks one."""
        by_tensor: dict[int, str] = {}
        names: dict[int, list[str]] = {}  # every name of a tensor, read by the graph or not (tied weights)
        for target, tensor in gm.named_parameters(remove_duplicate=False):
            names.setdefault(id(tensor), []).append(target.removeprefix(prefix))
        for target in tensor_targets(gm):
            tensor = tensor_meta(gm, target)
            if not is_fake(tensor):
                continue
            name = target.removeprefix(prefix)
            key = by_tensor.get(id(tensor))
            if key is None:
                key = by_tensor[id(tensor)] = name
                self.placeholders[key] = _placeholder(tensor)
            owner, leaf = owner_of(gm, target)
            owner._parameters[leaf] = self.placeholders[key]
            self.keys[target] = key
            saved = next((n for n in [name, *names.get(id(tensor), [])] if n in self.files), None)
            if saved is not None and key not in self.origin:
                self.origin[key] = (self.files[saved], saved)
        missing = sorted(t for t, k in self.keys.items() if k not in self.origin)
        if missing:
            raise UnsupportedGraphError(f"{self.checkpoint} lacks {len(missing)} weights the architecture in its "
                                        f"config.json needs, e.g. {[m.removeprefix(prefix) for m in missing[:3]]}: "
                                        "is it a complete safetensors checkpoint of that model?")

    # --- memory ----------------------------------------------------------------------------------

    def _read(self, path: Path, name: str) -> torch.Tensor:
        try:
            # Opened for each read: an open file stays mapped, and every page read from it would count
            # as resident memory until it is closed.
            with safe_open(path, "pt") as handle:
                # safetensors hands out 8-byte aligned memory; a copy gets the allocator's alignment, on
                # which BLAS rounds as it does for a model loaded in memory.
                return handle.get_tensor(name).clone()
        except (OSError, SafetensorError) as error:
            raise UnsupportedGraphError(f"cannot read tensor {name} from {path}: {error}") from error

    def _hold(self, key: str, tensor: torch.Tensor) -> None:
        self.cache[key] = tensor
        self.cache.move_to_end(key)
        self.held += tensor.numel() * tensor.element_size()
        self.peak = max(self.peak, self.held)
        self._fit(keep=key)

    def _fit(self, keep: str) -> None:
        """Evict least recently used values until the budget holds (never ``keep``, the one in use)."""
        while self.held > self.budget and len(self.cache) > 1:
            key = next(k for k in self.cache if k != keep)
            tensor = self.cache.pop(key)
            self.held -= tensor.numel() * tensor.element_size()
            if key in self.dirty:
                path = self._spill_root / f"{key}.safetensors"
                save_file({"value": tensor.to("cpu").contiguous()}, path)
                self.origin[key] = (path, "value")
                self.dirty.discard(key)
                self.spilled += 1
            self._evicted += tensor.numel() * tensor.element_size()
            del tensor  # freed before the heaps are trimmed below
        if self._evicted > self.budget // 4:
            self._evicted = 0
            _trim()

    def _forget(self, key: str) -> None:
        tensor = self.cache.pop(key, None)
        if tensor is not None:
            self.held -= tensor.numel() * tensor.element_size()
        self.dirty.discard(key)
        path, _ = self.origin.pop(key, (None, None))
        if path is not None and path.parent == self._spill_root:
            path.unlink(missing_ok=True)
        self.placeholders.pop(key, None)

    def close(self) -> None:
        """Remove the spill directory (also done when the store is garbage-collected)."""
        self._cleanup()


def _placeholder(tensor: torch.Tensor) -> torch.nn.Parameter:
    """What the graph holds for a streamed weight: its shape and dtype on the meta device."""
    return torch.nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"), requires_grad=False)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _glibc()


def _return_freed_memory() -> None:
    """Make glibc give freed blocks of 1 MiB and more back to the system at once. By default it raises
    that threshold to the size of the largest block freed so far, so weights read and evicted one after
    another are recycled inside the process and its resident memory grows toward the model's size."""
    if _LIBC is not None:
        M_MMAP_THRESHOLD = -3
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1024 * 1024)


def _trim() -> None:
    """Give the system back the free pages glibc keeps inside its heaps (smaller blocks freed in between)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def open_checkpoint(directory: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    budget: int = DEFAULT_BUDGET, spill: str | os.PathLike | None = None) -> tuple[torch.nn.Module, WeightStore]:
    """The causal LM of a safetensors checkpoint with fake parameters (no data), and the store
    its weights will stream from (in ``dtype``; ``budget`` bytes in memory; rewritten weights spill to a
    temporary directory under ``spill``, default the system's)."""
    from transformers import AutoConfig
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    directory = Path(directory)
    if not is_checkpoint(directory):
        raise UnsupportedGraphError(f"{directory} is not a Hugging Face safetensors checkpoint (config.json and "
                                    f"{_SINGLE} or {_INDEX})")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UnsupportedGraphError(f"{directory / 'config.json'} cannot be read: {error}") from error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Parameters on meta (nothing allocated or initialised); buffers real, computed by the model code.
        with init_empty_weights(include_buffers=False), no_init_weights():
            model = causal_lm_from_config(config, dtype)
        model.tie_weights()
    model.eval()
    # Then fake, on the device the weights will be on: the trace takes the device's code paths (kernel
    # output layouts differ between devices, and with them the captured graph).
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                if id(parameter) not in fakes:  # tied weights stay one tensor
                    with mode:
                        fakes[id(parameter)] = torch.nn.Parameter(
                            torch.empty(parameter.shape, dtype=parameter.dtype, device=device), requires_grad=False)
                module._parameters[name] = fakes[id(parameter)]
    store = WeightStore(directory, device, budget, spill)
    for name, buffer in list(model.named_buffers()):
        if name in store.files:  # a persistent buffer the checkpoint holds
            owner, leaf = owner_of(model, name)
            owner._buffers[leaf] = store._read(store.files[name], name).to(buffer.dtype)
    return model, store


def attach(gm: fx.GraphModule, store: WeightStore, prefix: str) -> fx.GraphModule:
    """Make ``store`` the home of ``gm``'s fake parameters (``gm`` was captured from ``open_checkpoint``'s model)."""
    store.adopt(gm, prefix)
    gm.meta[STREAMED] = store
    return gm


def materialize(gm: fx.GraphModule) -> fx.GraphModule:
    """Read every streamed weight into the graph (tied ones stay one tensor) and detach the store: the
    graph then runs like any other, holding its whole model in memory."""
    store = gm.meta.get(STREAMED)
    if store is None:
        return gm
    store.budget = 2**62  # everything is about to be held: spilling now would only cost writes
    values: dict[str, torch.nn.Parameter] = {}
    for target in tensor_targets(gm):
        if target not in store.keys:
            continue
        key = store.keys[target]
        if key not in values:
            values[key] = torch.nn.Parameter(store.get(target), requires_grad=False)
        owner, name = owner_of(gm, target)
        owner._parameters[name] = values[key]
    del gm.meta[STREAMED]
    store.close()
    return gm
