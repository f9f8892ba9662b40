"""The library never selects behaviour by model family: no family name appears anywhere in fxslice/."""

import pathlib
import re

FAMILIES = re.compile(
    r"\b(llama|mistral|mixtral|qwen\d*|gemma\d*|phi\d*|opt|gpt2|gpt_neox|neox|falcon|bloom|granite|stablelm|"
    r"olmo\w*|cohere|starcoder\w*|smollm\w*|gptj|codegen|persimmon|nemotron|deepseek\w*|baichuan|internlm\w*)\b",
    re.IGNORECASE,
)


def test_no_model_family_names_in_the_library():
    root = pathlib.Path(__file__).resolve().parent.parent / "fxslice"
    files = sorted(root.rglob("*.py"))
    assert files, f"no sources found under {root}"
    hits = [f"{path.relative_to(root.parent)}:{i}: {line.strip()}"
            for path in files for i, line in enumerate(path.read_text().splitlines(), 1) if FAMILIES.search(line)]
    assert not hits, "model family names in the library:\n" + "\n".join(hits)


def test_the_pattern_would_catch_a_family_name():
    assert FAMILIES.search("if config.model_type == 'llama':")
    assert FAMILIES.search("class GPT2Adapter") is None or FAMILIES.search("gpt2 adapter")
    assert not FAMILIES.search("optional options optimiser")
