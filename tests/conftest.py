import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "fxslice",
    deadline=None,
    derandomize=True,  # a fixed seed: CI and laptops draw the same architectures
    max_examples=int(os.environ.get("FXSLICE_EXAMPLES", "12")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("fxslice")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the measure every equivalence test uses."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(autouse=True, scope="session")
def _quiet_torch():
    # pytest-xdist runs several workers at once: the cores are shared among them. Session-wide, so module
    # fixtures compute with the same thread count as the tests (and the child processes told it).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // workers)))
    yield


def same_threads() -> str:
    """A line for a child Python process that compares logits bitwise with this one: the same thread count
    (a matmul split another way may sum in another order)."""
    return f"import torch; torch.set_num_threads({torch.get_num_threads()})\n"


def word_tokenizer(vocab_size: int = 128):
    """A whitespace word-level tokenizer over the most frequent words of the calibration text (offline)."""
    import collections
    import pathlib

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = (pathlib.Path(__file__).resolve().parent.parent / "data" / "wikitext-2" / "valid.txt").read_text()
    common = [w for w, _ in collections.Counter(text.split()).most_common(vocab_size - 2)]
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(common)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A saved tiny random llama with a word tokenizer: a model directory as users have them."""
    from hf_zoo import tiny_model

    directory = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config.eos_token_id = model.config.pad_token_id = 1
    model.save_pretrained(directory)
    word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory
