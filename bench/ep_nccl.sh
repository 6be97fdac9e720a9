#!/usr/bin/env bash
# EP=1 against EP=2 and TP=2 over NCCL, one GPU per shard, on a random V4
# wide enough for the GPU to matter; prints the same table as the CPU run of
# specray.bench.ep_bench and writes bench/results/ep_v4_bfloat16_cuda.{json,md}.
#
# Needs: 2 CUDA GPUs on this node (NCCL refuses two ranks on one GPU) and a
# CUDA build of torch in the environment (scripts/venv.sh installs the CPU
# build; make a separate venv).
#
#   bash bench/ep_nccl.sh                                  # hidden 2048, 64 experts
#   bash bench/ep_nccl.sh --hidden 4096 --steps 64         # any ep_bench flag
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$root"

gpus="$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
if [[ "$gpus" -lt 2 ]]; then
    echo "ep_nccl.sh: torch sees $gpus CUDA GPU(s); EP=2 over NCCL needs 2" >&2
    exit 2
fi
exec "$py" -m specray.bench.ep_bench --device cuda --dtype bfloat16 --layouts 1x1 1x2 2x1 \
    --hidden 2048 --experts 64 --threads 1 "$@"
