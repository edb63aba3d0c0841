# shellcheck shell=bash
# Environment for the pinned toolchain; source it after scripts/setup.sh:
#   . scripts/env.sh
# Everything Ansible writes goes under .cache/, so the suite needs no
# writable HOME and leaves nothing outside the repository.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO

case ":$PATH:" in
    *":$REPO/.venv/bin:"*) ;;
    *) export PATH="$REPO/.venv/bin:$PATH" ;;
esac
case ":${PYTHONPATH:-}:" in
    *":$REPO/.cache/collections:"*) ;;
    *) export PYTHONPATH="$REPO/.cache/collections${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

# The interpreter playbooks should use for localhost / netns hosts
# (interpreter discovery may pick a pyenv shim that does not run).
export MESHCAPTURE_PYTHON="$REPO/.venv/bin/python"

export ANSIBLE_COLLECTIONS_PATH="$REPO/.cache/collections"
export ANSIBLE_HOME="$REPO/.cache/ansible-home"
export ANSIBLE_LOCAL_TEMP="$REPO/.cache/ansible-tmp/local"
export ANSIBLE_REMOTE_TEMP="$REPO/.cache/ansible-tmp/remote"
export ANSIBLE_ASYNC_DIR="$REPO/.cache/ansible-tmp/async"
mkdir -p "$ANSIBLE_HOME" "$ANSIBLE_LOCAL_TEMP" "$ANSIBLE_REMOTE_TEMP" "$ANSIBLE_ASYNC_DIR"
[ -t 1 ] || export ANSIBLE_NOCOLOR=1
export LC_ALL=C.UTF-8
