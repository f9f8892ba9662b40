"""Greedy generation from a directory written by ``fxslice export``, with torch alone.

    python examples/generate_pt2.py EXPORTED --ids 1,2,3 --max-new-tokens 20 [--compiled]
    python examples/generate_pt2.py EXPORTED --prompt "Paris is"     # needs the `tokenizers` package

Checks every file's sha256 against ``manifest.json`` first, prefills the prompt with one call of
``decode.pt2`` and feeds one token per call after that. Prints the token ids (and the text when a
tokenizer was exported and ``tokenizers`` is installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch


def verified_manifest(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        with open(directory / name, "rb") as file:
            if hashlib.file_digest(file, "sha256").hexdigest() != digest:
                sys.exit(f"{directory / name} does not have the sha256 in manifest.json: changed or corrupted")
    return manifest


def load_step(directory: Path, manifest: dict, compiled: bool):
    if compiled:
        if "decode_aoti" not in manifest["compiled"]:
            sys.exit(f"{directory} has no compiled package: export it with --compiled")
        return torch._inductor.aoti_load_package(str(directory / manifest["compiled"]["decode_aoti"]))
    return torch.export.load(directory / manifest["decode"]["file"]).module()


@torch.no_grad()
def generate(step, ids: torch.Tensor, max_new_tokens: int, cache_len: int, eos: int | None = None) -> torch.Tensor:
    """Greedy continuation of ``ids`` [B, T] (no padding): one prefill call, then one call per token."""
    batch, length = ids.shape
    if length + max_new_tokens >= cache_len:
        raise ValueError(f"prompt + new tokens ({length} + {max_new_tokens}) must stay below the cache ({cache_len})")
    positions = torch.arange(length)
    logits = step(input_ids=ids, attention_mask=torch.ones(batch, length, dtype=torch.long),
                  position_ids=positions.expand(batch, -1).contiguous(), cache_position=positions)
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        if eos is not None and bool((token == eos).all()):
            break
        position = torch.tensor([ids.shape[1] - 1])
        logits = step(input_ids=token, attention_mask=torch.ones_like(ids),
                      position_ids=position.expand(batch, 1).contiguous(), cache_position=position)
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--ids", help="comma-separated prompt token ids")
    parser.add_argument("--prompt", help="prompt text (needs the exported tokenizer and `tokenizers`)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--compiled", action="store_true", help="use the AOTInductor package")
    args = parser.parse_args(argv)
    manifest = verified_manifest(args.directory)
    tokenizer = None
    if args.prompt is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(args.directory / "tokenizer.json"))
        prompt = tokenizer.encode(args.prompt).ids
    elif args.ids:
        prompt = [int(i) for i in args.ids.split(",")]
    else:
        parser.error("give --ids or --prompt")
    step = load_step(args.directory, manifest, args.compiled)
    eos = manifest.get("eos_token_id")
    out = generate(step, torch.tensor([prompt]), args.max_new_tokens, manifest["decode"]["cache_len"],
                   eos if isinstance(eos, int) else None)
    print(",".join(str(i) for i in out[0].tolist()))
    if tokenizer is not None:
        print(tokenizer.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
