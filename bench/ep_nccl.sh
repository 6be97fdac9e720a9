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
source "$(dirname "${BASH_SOURCE[0]}")/cuda_env.sh"
need_cuda_gpus 2 ep_nccl.sh "EP=2 over NCCL"
exec "$py" -m specray.bench.ep_bench --device cuda --dtype bfloat16 --layouts 1x1 1x2 2x1 \
    --hidden 2048 --experts 64 --threads 1 "$@"
