"""Running the capture role on a throwaway namespace host (the integration
tests of the role).  Everything the role writes goes below the test's
tmp_path."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
COLLECTIONS = REPO / ".cache" / "collections"

PLAYBOOK = """
- name: Apply the capture role
  hosts: all
  gather_facts: false
  roles:
    - role: meshcapture.sidecar.capture
"""


def run_role(ns, tmp_path, cli=(), **capture_vars):
    """Run the role on namespace ns with the given variables (cli: more ansible-playbook arguments); writes
    below tmp_path."""
    if not (COLLECTIONS / "ansible_collections/meshcapture/sidecar").exists() or not PYTHON.exists():
        pytest.skip("run scripts/setup.sh first")
    root = tmp_path / "host"
    (root / "systemd").mkdir(parents=True, exist_ok=True)
    hostvars = {
        "ansible_connection": "meshcapture.sidecar.netns",
        "ansible_host": ns.name,
        "ansible_python_interpreter": str(PYTHON),
        "capture_install_dependencies": False,
        "capture_persist_dir": str(root / "persist"),
        "capture_systemd_unit_dir": str(root / "systemd"),
        "capture_systemd_enable": False,
        "capture_state_dir": str(root / "state"),
        "capture_istio_sidecar_env_path": str(root / "sidecar.env"),
        **capture_vars,
    }
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"all": {"hosts": {"host": hostvars}}}))
    playbook = tmp_path / "site.yml"
    playbook.write_text(PLAYBOOK)
    return subprocess.run(
        ["bash", "-c", '. "$0/scripts/env.sh" && exec "$@"', str(REPO),
         "ansible-playbook", "-i", str(inventory), str(playbook), *cli],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
