"""The meshcapture.sidecar.netns connection plugin runs every task type inside
the namespace: raw, command, copy (put_file), slurp and fetch (fetch_file)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / ".venv" / "bin" / "python"

PLAYBOOK = """
- name: Tasks run inside the namespace
  hosts: all
  gather_facts: false
  tasks:
    - name: Raw
      ansible.builtin.raw: readlink /proc/self/ns/net
      register: raw_ns
    - name: Command
      ansible.builtin.command: readlink /proc/self/ns/net
      register: command_ns
      changed_when: false
    - name: Interfaces
      ansible.builtin.command: cat /proc/self/net/dev
      register: net_dev
      changed_when: false
    - name: Copy
      ansible.builtin.copy:
        content: "hello from {{ inventory_hostname }}\\n"
        dest: "{{ workdir }}/{{ inventory_hostname }}.txt"
        mode: "0644"
    - name: Slurp
      ansible.builtin.slurp:
        src: "{{ workdir }}/{{ inventory_hostname }}.txt"
      register: slurped
    - name: Fetch
      ansible.builtin.fetch:
        src: "{{ workdir }}/{{ inventory_hostname }}.txt"
        dest: "{{ workdir }}/{{ inventory_hostname }}.fetched"
        flat: true
    - name: Report
      ansible.builtin.copy:
        content: "{{ report | to_json }}"
        dest: "{{ workdir }}/{{ inventory_hostname }}.json"
        mode: "0644"
      vars:
        report:
          raw: "{{ raw_ns.stdout | trim }}"
          command: "{{ command_ns.stdout }}"
          net_dev: "{{ net_dev.stdout }}"
          slurped: "{{ slurped.content | b64decode }}"
"""


def ansible(argv, cwd, timeout=180):
    """Run an Ansible command with the environment of scripts/env.sh."""
    if not (REPO / ".cache/collections/ansible_collections/meshcapture/sidecar").exists() or not PYTHON.exists():
        pytest.skip("run scripts/setup.sh first")
    return subprocess.run(["bash", "-c", '. "$0/scripts/env.sh" && exec "$@"', str(REPO), *argv],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def write_inventory(path, hosts):
    common = {"ansible_connection": "meshcapture.sidecar.netns", "ansible_python_interpreter": str(PYTHON)}
    path.write_text(json.dumps({"all": {"hosts": {name: {**common, **hostvars} for name, hostvars in hosts.items()}}}))


def test_ansible_doc():
    proc = ansible(["ansible-doc", "-t", "connection", "meshcapture.sidecar.netns"], cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "netns_name" in proc.stdout and "ip_executable" in proc.stdout


@pytest.mark.netns
def test_tasks_run_inside_the_namespace(netns_factory, tmp_path):
    ns = netns_factory("conn")
    inside = ns.netns_id()
    assert inside != os.readlink("/proc/self/ns/net")
    write_inventory(tmp_path / "inventory.yml", {
        "by_host": {"ansible_host": ns.name},
        # ansible_netns_name wins over ansible_host
        "by_name": {"ansible_host": "mcs-not-this-one", "ansible_netns_name": ns.name},
    })
    (tmp_path / "playbook.yml").write_text(PLAYBOOK)

    proc = ansible(["ansible-playbook", "-i", "inventory.yml", "-e", f"workdir={tmp_path}", "playbook.yml"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    for host in ("by_host", "by_name"):
        report = json.loads((tmp_path / f"{host}.json").read_text())
        assert report["raw"] == report["command"] == inside
        interfaces = [line.split(":")[0].strip() for line in report["net_dev"].splitlines()[2:]]
        assert interfaces == ["lo"]
        assert report["slurped"] == f"hello from {host}\n"
        assert (tmp_path / f"{host}.fetched").read_text() == f"hello from {host}\n"


@pytest.mark.netns
def test_missing_namespace_is_unreachable(tmp_path):
    write_inventory(tmp_path / "inventory.yml", {"gone": {"ansible_host": "mcs-no-such-netns"}})
    proc = ansible(["ansible", "-i", "inventory.yml", "all", "-m", "ansible.builtin.raw", "-a", "true"],
                   cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "UNREACHABLE" in proc.stdout
    assert "network namespace 'mcs-no-such-netns' does not exist" in proc.stdout
