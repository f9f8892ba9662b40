"""Perplexity over non-overlapping windows, as SliceGPT evaluates."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import consecutive_windows, leading_tokens

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    text_or_path: str | os.PathLike | torch.Tensor,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """exp(mean next-token NLL) over the first ``max_windows`` non-overlapping ``seq_len``-token windows.

    Each window is the tokenizer's leading special tokens (``fxslice.data.leading_tokens``: a ``<bos>`` or
    nothing) followed by the next stretch of text, scored on its own: every text token after the first
    position is predicted from its prefix in the window; the mean is over all predicted tokens. Works for
    any callable returning ``.logits`` (or a logits tensor). ``text_or_path`` may also be the windows
    themselves (``[count, seq_len]`` token ids, as ``consecutive_windows`` makes them).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2; got {seq_len}")
    if isinstance(text_or_path, torch.Tensor):
        windows = text_or_path
    else:
        windows = consecutive_windows(tokenizer, text_or_path, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    count, lead = windows.shape[0], len(leading_tokens(tokenizer))
    first = max(lead, 1)  # the first position scored: a leading special token is given, not predicted
    device = _device(model)
    total, n = 0.0, 0
    for start in tqdm(range(0, count, batch_size), desc="perplexity", disable=not progress, unit="batch"):
        ids = windows[start : start + batch_size].to(device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = out.logits if hasattr(out, "logits") else out
        predicted, targets = logits[:, first - 1 : -1], ids[:, first:]
        nll = F.cross_entropy(predicted.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += nll.item()
        n += targets.numel()
    return math.exp(total / n)


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
