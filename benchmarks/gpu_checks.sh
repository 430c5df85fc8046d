#!/usr/bin/env bash
# The GPU checks of benchmarks/RESULTS.md in one command, each step logged under OUT:
#   1. the fast-path tests (CPU, as CI runs them; confirms the install),
#   2. benchmarks/speed.py on CUDA: fp32 and bf16 for ViT-B/16, Swin-T and ResNet-18
#      (bf16 with peak memory), ResNet-18 with channels-last,
#   3. a short end-to-end run: the main job (every method and baseline on digits) on
#      CUDA with ResNet-18 at 32 px.
# Usage: benchmarks/gpu_checks.sh [OUT]   (default OUT: gpu-results)
set -o pipefail
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, keep going on failure
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
step tests python -m pytest -q -x tests/test_fast_paths.py tests/test_layers.py
step speed-bf16 python benchmarks/speed.py --device cuda --precision bf16 \
    --backbones vit-b16,swin-t,resnet18 --json "$out/speed-bf16.json"
step speed-fp32 python benchmarks/speed.py --device cuda --no-memory \
    --backbones vit-b16,swin-t,resnet18 --json "$out/speed-fp32.json"
step speed-bf16-channels-last python benchmarks/speed.py --device cuda --precision bf16 \
    --channels-last --no-memory --backbones resnet18 --json "$out/speed-cl.json"
step end-to-end python -m avalanche_maskrkr run --device cuda --model resnet18_cifar \
    --img-size 32
