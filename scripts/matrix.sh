#!/usr/bin/env bash
# The controller x target compatibility matrix (docs/compatibility.md):
# ansible-core 2.16 to 2.19 on the controller, Python 3.6 to 3.13 and the
# oldest and newest supported pyroute2 on the target, each cell checked with
# the core's unit tests on the target's Python and a real-kernel
# apply / re-apply / remove of the rules and routes modules in a network
# namespace. The virtualenvs are made once, under .cache/matrix/ (or
# $MESHCAPTURE_MATRIX_CACHE); they need PyPI the first time.
#   bash scripts/matrix.sh            # the reduced matrix (3 cells, CI)
#   bash scripts/matrix.sh --full     # every cell
#   bash scripts/matrix.sh --cell 2.17:3.8:oldest --cell 2.19:3.12:0.9.7
#   bash scripts/matrix.sh --full --list
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh >/dev/null
. scripts/env.sh
exec python tests/matrix/matrix.py "$@"
