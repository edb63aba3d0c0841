#!/usr/bin/env bash
# The demo on a throwaway network-namespace host. Sets everything up on a
# fresh machine first; arguments go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. scripts/env.sh

if [ ! -f "$REPO/scripts/demo.py" ]; then
    echo "demo: scripts/demo.py is not written yet" >&2
    exit 1
fi
exec python "$REPO/scripts/demo.py" "$@"
