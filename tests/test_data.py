"""Token windows for calibration and perplexity follow the tokenizer's convention: a tokenizer that puts
``<bos>`` in front of text gets it at position 0 of every window; one that puts nothing gets plain text."""

import math

import torch

from conftest import word_tokenizer
from fxslice.data import calibration_batches, leading_tokens, tokenize_text
from fxslice.eval import perplexity

TEXT = " ".join(f"w{i % 7} w{i % 5}" for i in range(200))


def bos_tokenizer():
    """The word tokenizer with ``<bos>`` added in front of every text, as Gemma's and Llama's do."""
    from tokenizers import processors

    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return tokenizer, bos


def test_leading_tokens_are_what_the_tokenizer_puts_before_text():
    tokenizer, bos = bos_tokenizer()
    assert leading_tokens(tokenizer) == [bos]
    assert leading_tokens(word_tokenizer()) == []


def test_calibration_windows_start_with_bos_and_keep_their_length():
    tokenizer, bos = bos_tokenizer()
    batches = calibration_batches(tokenizer, TEXT, n_samples=5, seq_len=16, batch_size=2, seed=3)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (5, 16) and (ids[:, 0] == bos).all() and (ids[:, 1:] != bos).all()
    text = tokenize_text(tokenizer, TEXT).tolist()
    for row in ids[:, 1:].tolist():  # the rest is a contiguous stretch of the text
        assert any(text[s : s + 15] == row for s in range(len(text) - 14))


def test_without_leading_tokens_windows_are_plain_text():
    tokenizer = word_tokenizer()
    ids = torch.cat([b["input_ids"] for b in calibration_batches(tokenizer, TEXT, 4, 16, 2, seed=3)])
    text = tokenize_text(tokenizer, TEXT)
    starts = torch.randint(0, text.numel() - 16 + 1, (4,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids, torch.stack([text[s : s + 16] for s in starts.tolist()]))


def test_perplexity_windows_start_with_bos_and_score_every_text_token():
    tokenizer, bos = bos_tokenizer()
    seen = []

    def uniform(input_ids, attention_mask):  # logits of a uniform model: perplexity = vocabulary size
        seen.append(input_ids)
        return torch.zeros(*input_ids.shape, 130)

    assert math.isclose(perplexity(uniform, tokenizer, TEXT, seq_len=16, max_windows=3), 130, rel_tol=1e-6)
    windows = torch.cat(seen)
    text = tokenize_text(tokenizer, TEXT)
    assert windows.shape == (3, 16) and (windows[:, 0] == bos).all()
    assert torch.equal(windows[:, 1:].reshape(-1), text[:45])  # consecutive, non-overlapping stretches
