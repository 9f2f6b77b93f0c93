#!/usr/bin/env bash
# On a machine with a CUDA GPU: train_mfu (both attention kernels, with a kernel profile), the CUDA tests
# (tests/test_cuda.py, tests/test_model.py), then train_throughput in bf16. Logs and results go to $OUT, else
# benchmarks/results/gpu. Each part has its own time limit (MFU_TIMEOUT, TESTS_TIMEOUT, THROUGHPUT_TIMEOUT),
# and a part that fails or runs out of time does not stop the others. GPU_NAME (h100, h200, a100): the
# data-sheet peak for MFU, when the GPU's own name does not say.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo "== train_mfu"
    timeout "${MFU_TIMEOUT:-300}" python3 -m benchmarks.train_mfu.bench --profile \
        ${GPU_NAME:+--device-name "$GPU_NAME"}
    echo "== tests"
    timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q --tb=short -p no:cacheprovider tests/test_cuda.py \
        tests/test_model.py
    echo "== train_throughput"
    timeout "${THROUGHPUT_TIMEOUT:-150}" python3 -m benchmarks.train_throughput.bench --rounds 30
    cp benchmarks/results/train_mfu.json benchmarks/results/train_throughput.json "$out/" 2>/dev/null
} 2>&1 | tee "$out/gpu_check.log"
