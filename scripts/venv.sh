#!/usr/bin/env bash
# Create (once) and reuse ./.venv with specray and the exact versions of
# constraints.txt. torch comes from `pip install torch==2.13.0` first: on CPU
# machines that is the CPU wheel, and pyproject.toml's range is then already
# satisfied, so no resolver can pull a multi-GB CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.specray-installed"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] \
    || [ "$root/constraints.txt" -nt "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q torch==2.13.0
  "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[dev]"
  touch "$stamp"
fi
# The compiled CPU kernels (actors/parallel/csrc), built once per source and
# compiler (about a minute of one core), so that no server start or test
# waits on the build. Where they cannot run here this prints why.
"$venv/bin/python" -c 'from specray.actors.parallel.block_kernel import block_kernel_reason
print("compiled CPU kernels:", block_kernel_reason() or "ready")'
