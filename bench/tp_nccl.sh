#!/usr/bin/env bash
# TP=1 against TP=2 over NCCL, one GPU per shard; prints the same table as the
# CPU run of specray.bench.tp_bench and writes bench/results/tp_*_cuda.{json,md}.
#
# Needs: 2 CUDA GPUs on this node (NCCL refuses two ranks on one GPU), and a
# CUDA build of torch 2.13 in the environment (scripts/venv.sh installs the
# CPU build; make a separate venv). Ray is embedded and bound to 127.0.0.1;
# pass --address HOST:PORT to use an existing cluster instead (then the shards
# may sit on different nodes and NCCL uses their network).
#
#   bash bench/tp_nccl.sh                                   # 1.5B, bf16
#   bash bench/tp_nccl.sh --model /path/to/model --steps 32 # any tp_bench flag
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cuda_env.sh"
need_cuda_gpus 2 tp_nccl.sh "TP=2 over NCCL"
# One CPU thread per shard is plenty: the GPU does the work.
exec "$py" -m specray.bench.tp_bench --device cuda --dtype bfloat16 --tp 1 2 --threads 1 1 "$@"
