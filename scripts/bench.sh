#!/usr/bin/env bash
# The benchmark (docs/performance.md): sets up the toolchain, then runs
# bench/bench.py with the given arguments (e.g. --quick).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. scripts/env.sh
exec python bench/bench.py "$@"
