"""Run one of this collection's modules as Ansible would, without Ansible.

The module file runs as a subprocess (``python -m
ansible_collections.meshcapture.sidecar.plugins.modules.NAME ARGS.json``),
optionally inside a network namespace (``ip netns exec``), with this
interpreter and the collection tree of scripts/setup.sh on PYTHONPATH.
Its JSON result is returned as a dict.

Standard library only; import it like tests/netns.py (tests/conftest.py
puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

COLLECTIONS = Path(__file__).resolve().parent.parent / ".cache" / "collections"
MODULE_PACKAGE = "ansible_collections.meshcapture.sidecar.plugins.modules"


class ModuleRunError(RuntimeError):
    """The module printed no JSON result (it crashed, or could not start)."""


def run_module(name, args, netns=None, check=False, diff=False, timeout=120.0) -> dict:
    """Run module ``name`` (e.g. ``"routes"``) with ``args`` and return its result.

    ``netns``: a namespace name, or an object with ``.name`` (netns.Netns),
    to run the module inside; ``check`` / ``diff``: check mode / --diff.
    A module failure is a normal result (``failed: true``, ``msg``); only a
    run without a JSON result raises ModuleRunError.
    """
    module_args = dict(args)
    if check:
        module_args["_ansible_check_mode"] = True
    if diff:
        module_args["_ansible_diff"] = True
    argv = [sys.executable, "-m", f"{MODULE_PACKAGE}.{name}"]
    if netns is not None:
        argv = ["ip", "netns", "exec", getattr(netns, "name", netns), *argv]
    pythonpath = os.pathsep.join(filter(None, [str(COLLECTIONS), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, LC_ALL="C.UTF-8")

    with tempfile.NamedTemporaryFile("w", prefix=f"{name}-args-", suffix=".json") as args_file:
        json.dump({"ANSIBLE_MODULE_ARGS": module_args}, args_file)
        args_file.flush()
        proc = subprocess.run([*argv, args_file.name], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=tempfile.gettempdir(), check=False)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise ModuleRunError(f"module {name} (rc={proc.returncode}) printed no JSON result\n"
                             f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}") from None


def warning_messages(result) -> list:
    """The texts of a result's warnings (ansible-core 2.19 returns them as
    WarningSummary objects, older versions as plain strings)."""
    return [w["event"]["msg"] if isinstance(w, dict) else w for w in result.get("warnings", [])]
