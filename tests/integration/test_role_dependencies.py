"""The capture role installs its dependencies only when they are missing
(roles/capture/tasks/dependencies.yml), on a throwaway namespace host.

* Already there: the target interpreter (the venv's) imports pyroute2 and
  the commands exist, so the role gathers no facts and runs no package
  manager.
* Missing and not installable: the system Python has no pyroute2 and the
  package to install does not exist (capture_install_packages names a bogus
  one, so the package manager fails at once and changes nothing); the error
  says what is missing and how to skip the step, before any rule changes.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"
COLLECTIONS = REPO / ".cache" / "collections"
SYSTEM_PYTHON = "/usr/bin/python3"

PLAYBOOK = """
- name: Apply the capture role
  hosts: all
  gather_facts: false
  roles:
    - role: meshcapture.sidecar.capture
"""


def run_role(ns, tmp_path, **capture_vars):
    if not (COLLECTIONS / "ansible_collections/meshcapture/sidecar").exists() or not PYTHON.exists():
        pytest.skip("run scripts/setup.sh first")
    root = tmp_path / "host"
    (root / "systemd").mkdir(parents=True, exist_ok=True)
    hostvars = {
        "ansible_connection": "meshcapture.sidecar.netns",
        "ansible_host": ns.name,
        "ansible_python_interpreter": str(PYTHON),
        "capture_persist_dir": str(root / "persist"),
        "capture_systemd_unit_dir": str(root / "systemd"),
        "capture_systemd_enable": False,
        "capture_state_dir": str(root / "state"),
        "capture_istio_sidecar_env_path": str(root / "sidecar.env"),
        "capture_inbound_ports_include": "8080",
        **capture_vars,
    }
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": {"host": hostvars}}}))
    playbook = tmp_path / "site.yml"
    playbook.write_text(PLAYBOOK)
    return subprocess.run(
        ["bash", "-c", '. "$0/scripts/env.sh" && exec "$@"', str(REPO),
         "ansible-playbook", "-v", "-i", str(inventory), str(playbook)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)


def task_lines(stdout, name):
    """The result lines (ok/changed/skipping/fatal) of the task called name."""
    block = stdout.split("TASK [meshcapture.sidecar.capture : %s]" % name)
    return [] if len(block) < 2 else [line for line in block[1].split("TASK [")[0].splitlines()
                                      if line.startswith(("ok:", "changed:", "skipping:", "fatal:"))]


@pytest.mark.netns
def test_nothing_is_installed_when_everything_is_there(netns_factory, tmp_path):
    ns = netns_factory("deps")
    proc = run_role(ns, tmp_path, capture_install_dependencies=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The venv interpreter is named: no interpreter discovery, one look.
    assert task_lines(proc.stdout, "Find the target's Python interpreter")[0].startswith("skipping:")
    look = task_lines(proc.stdout, "Look for the commands and the Python module the capture needs")
    assert look and look[0].startswith("ok:"), proc.stdout
    for name in ("Gather the OS family", "Install the packages that provide what is missing"):
        lines = task_lines(proc.stdout, name)
        assert lines and all(line.startswith("skipping:") for line in lines), (name, proc.stdout)
    assert "ISTIO_INBOUND" in ns.run(["iptables-nft-save"]).stdout


@pytest.mark.netns
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no %s" % SYSTEM_PYTHON)
def test_a_failed_install_names_what_is_missing_and_how_to_skip(netns_factory, tmp_path):
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pyroute2"], capture_output=True, check=False)
    if probe.returncode == 0:
        pytest.skip("%s imports pyroute2: nothing would be missing" % SYSTEM_PYTHON)
    ns = netns_factory("deps")
    proc = run_role(ns, tmp_path, ansible_python_interpreter=SYSTEM_PYTHON, capture_install_dependencies=True,
                    capture_install_packages=["meshcapture-no-such-package"])
    assert proc.returncode != 0
    assert ("capture_install_dependencies: missing on the host: the Python module pyroute2 for /usr/bin/python3;"
            " installing meshcapture-no-such-package failed (") in proc.stdout, proc.stdout
    assert ("Install them yourself (or give the host a package mirror) and run again, or set"
            " capture_install_dependencies to false to skip this step.") in proc.stdout
    assert "ISTIO" not in ns.run(["iptables-nft-save"]).stdout
