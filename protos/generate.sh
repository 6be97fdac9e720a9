#!/usr/bin/env sh
# Regenerate the gRPC stubs under protos/specray/v1 (see protos/generate.py).
# Pass --check to only verify that the committed stubs are up to date.
set -eu
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m specray.protos.generate "$@"
