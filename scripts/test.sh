#!/usr/bin/env bash
# The test command: set up ./.venv if needed, then lint, type-check the
# package (actors, cluster, deploy) and run the whole test suite (slow and
# real-model tests included).
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/venv.sh"
cd "$root"
py="$root/.venv/bin/python"

"$py" -m ruff check .
"$py" -m ruff format --check .

# mypy resolves `specray.*` through a link named after the package, since the
# repository root is the package.
typeroot="$(mktemp -d)"
trap 'rm -rf "$typeroot"' EXIT
ln -s "$root" "$typeroot/specray"
MYPYPATH="$typeroot" "$py" -m mypy -p specray.actors -p specray.cluster -p specray.deploy -p specray.bench

# Two workers (SPECRAY_TEST_WORKERS; 0 runs in this process), each given
# whole test files, so a module's Ray instance and servers stay in one
# process: most of a test's time is spent waiting for processes to start
# and answer, which left half of two cores idle. The slowest tests are
# named at the end of every run, to keep the suite short.
"$py" -m pytest -n "${SPECRAY_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
  --durations=25 "$@"
