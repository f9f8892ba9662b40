"""Loading a local Hugging Face causal LM and its tokenizer (a model directory, or a GGUF file in one)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UnsupportedGraphError

__all__ = ["load_causal_lm"]


def load_causal_lm(path: str | os.PathLike, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local directory; never downloads (``local_files_only``).

    ``gguf_file`` names a GGUF file inside ``path`` (transformers de-quantises it to ``dtype``); a path
    that is itself a ``.gguf`` file is split into directory and file name.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
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
        except (OSError, ValueError) as error:
            raise UnsupportedGraphError(f"cannot load a causal LM from {path}: {error}") from error
    return model.eval(), tokenizer
