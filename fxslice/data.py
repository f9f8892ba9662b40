"""Text -> token windows for calibration and evaluation (datasets holds and batches the windows)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from .errors import CalibrationError

__all__ = ["calibration_batches", "consecutive_windows", "join_rows", "leading_tokens", "read_text", "text_windows",
           "tokenize_text", "windows_to_batches"]


def read_text(text_or_path: str | os.PathLike) -> str:
    """The text itself, or the contents of the file it names (UTF-8)."""
    if isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str) and "\n" not in text_or_path and len(text_or_path) < 4096
        and (os.path.exists(text_or_path) or text_or_path.endswith((".txt", ".text", ".raw", ".tokens")))
    ):
        path = Path(text_or_path)
        if not path.is_file():
            raise CalibrationError(f"text file not found: {path}")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CalibrationError(f"cannot read text file {path}: {error}") from error
    if not isinstance(text_or_path, str):
        raise CalibrationError(f"expected text or a path to a text file; got {type(text_or_path).__name__}")
    return text_or_path


def join_rows(path: str | os.PathLike) -> str:
    """A line-per-row dataset file as one text, its rows joined by blank lines (each row keeps its newline,
    a blank row becomes empty): how the reference SliceGPT reads WikiText-2 for calibration and
    evaluation alike, so perplexities measured on this stream are comparable with its numbers."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"text file not found: {path}")
    try:
        with path.open(encoding="utf-8") as rows:
            return "\n\n".join(row if row.strip() else "" for row in rows)
    except (OSError, UnicodeDecodeError) as error:
        raise CalibrationError(f"cannot read text file {path}: {error}") from error


def tokenize_text(tokenizer: Any, text_or_path: str | os.PathLike) -> torch.Tensor:
    """All tokens of the text, as one 1-D LongTensor (no special tokens added)."""
    text = read_text(text_or_path)
    if not text.strip():
        raise CalibrationError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def leading_tokens(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of any text (a ``<bos>`` for many tokenizers, nothing
    for byte-level BPE ones). Models trained with them expect them at position 0: a window without them is
    scored worse and calibrates without the activations the first token draws (an attention sink)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def text_windows(tokenizer: Any, tokens: torch.Tensor, seq_len: int, starts: list[int]) -> torch.Tensor:
    """``[len(starts), seq_len]`` windows: the tokenizer's leading tokens, then text tokens from each start."""
    lead = torch.tensor(leading_tokens(tokenizer), dtype=torch.long)
    body = seq_len - lead.numel()
    if body < 1:
        raise CalibrationError(f"seq_len={seq_len} leaves no room for text after the tokenizer's "
                               f"{lead.numel()} leading special tokens")
    return torch.stack([torch.cat([lead, tokens[s : s + body]]) for s in starts])


def consecutive_windows(tokenizer: Any, text_or_path: str | os.PathLike, seq_len: int = 512) -> torch.Tensor:
    """Every non-overlapping ``seq_len``-token window of the text, in order (the last partial one dropped):
    how ``fxslice.eval.perplexity`` scores a text and how ``fxslice heal`` trains on one."""
    tokens = tokenize_text(tokenizer, text_or_path)
    body = seq_len - len(leading_tokens(tokenizer))
    count = tokens.numel() // body if body > 0 else 0
    if count == 0:
        raise CalibrationError(f"the text has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return text_windows(tokenizer, tokens, seq_len, [i * body for i in range(count)])


def windows_to_batches(windows: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``[n, seq_len]`` token windows -> a list of model-input dicts of at most ``batch_size`` rows."""
    dataset = Dataset.from_dict({"input_ids": windows.tolist()}).with_format("torch")
    return [
        {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}
        for batch in dataset.iter(batch_size=batch_size)
    ]


def calibration_batches(
    tokenizer: Any,
    text_or_path: str | os.PathLike,
    n_samples: int = 64,
    seq_len: int = 512,
    batch_size: int = 8,
    seed: int = 42,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` random windows of ``seq_len`` tokens from the text, as SliceGPT calibrates, each
    starting with the tokenizer's leading special tokens (``leading_tokens``) as the model saw in training.

    Window starts are drawn uniformly with ``torch.Generator().manual_seed(seed)``, so the same text,
    tokenizer and seed always give the same batches.
    """
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be a positive integer; got {value!r}")
    tokens = tokenize_text(tokenizer, text_or_path)
    if tokens.numel() < seq_len:
        raise CalibrationError(f"the text has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    body = seq_len - len(leading_tokens(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (n_samples,), generator=generator)
    return windows_to_batches(text_windows(tokenizer, tokens, seq_len, starts.tolist()), batch_size)
