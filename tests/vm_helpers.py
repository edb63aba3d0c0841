"""Helpers of the VM scenario (tests/integration/test_vm.py).

The VM itself (image, namespace, tap, qemu, SSH) is scripts/vm/vmctl.py; the
listings and the traffic checks are scripts/vm/vmcheck.py. Here: the built
collection, and ansible-playbook run from inside the VM's namespace with
that collection only.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "vm"))
import vmcheck  # noqa: E402
import vmctl  # noqa: E402

PYTHON = REPO / ".venv" / "bin" / "python"
BACKENDS = ("iptables-nft", "nftables")
RELEASES = tuple(r.strip() for r in os.environ.get("MESHCAPTURE_VM_RELEASES", "bookworm").split(",") if r.strip())
ENABLED = os.environ.get("MESHCAPTURE_VM_TESTS", "") == "1"

SITE = """
- name: The capture on the VM
  hosts: vm
  gather_facts: false
  roles:
    - role: meshcapture.sidecar.capture
"""


_live: set = set()  # Scenarios started and not closed yet


@atexit.register
def _close_leftovers():
    """Last resort (an interrupted run): kill qemu, delete the namespace."""
    for scenario in list(_live):
        scenario.close()


def skip_reason():
    """Why the VM tests do not run here, or None."""
    if not ENABLED:
        return ("VM scenario not requested: set MESHCAPTURE_VM_TESTS=1 (needs root, qemu; "
                "scripts/vm/setup-host.sh installs it)")
    reason = vmctl.unavailable_reason()
    if reason:
        return reason
    if not PYTHON.exists():
        return "run scripts/setup.sh first"
    return None


def shell_env(collections):
    """scripts/env.sh, then only the installed collection: PYTHONPATH (which
    env.sh points at the checkout) cleared, ANSIBLE_COLLECTIONS_PATH set."""
    return ["bash", "-c", '. "$0/scripts/env.sh" && unset PYTHONPATH && export ANSIBLE_COLLECTIONS_PATH="$1"'
            ' && shift && exec "$@"', str(REPO), str(collections)]


def build_collection(tmp: Path) -> Path:
    """ansible-galaxy collection build + install into tmp/collections."""
    build, path = tmp / "build", tmp / "collections"
    prefix = shell_env(path)
    subprocess.run(prefix + ["ansible-galaxy", "collection", "build", "--output-path", str(build), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    tarball, = build.glob("meshcapture-sidecar-*.tar.gz")
    subprocess.run(prefix + ["ansible-galaxy", "collection", "install", str(tarball), "-p", str(path)],
                   check=True, capture_output=True, text=True, timeout=300)
    return path


def recap(proc) -> dict:
    """The PLAY RECAP counters of host vm."""
    match = re.search(r"^vm\s+:\s+(.*)$", proc.stdout, re.M)
    if not match:
        return {}
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Scenario:
    """One VM (one release) and the role with one backend, over SSH."""

    def __init__(self, release: str, backend: str, collections: Path):
        self.release, self.backend, self.collections = release, backend, collections
        self.dir = Path(tempfile.mkdtemp(prefix="mcs-vm-"))  # short: ssh ControlPath
        self.vm = vmctl.VM(self.dir / "vm", release)
        self.runs = 0
        self.state: dict = {}
        self.timings: dict = {}

    def start(self):
        start = time.monotonic()
        _live.add(self)
        try:
            self.vm.start()
        except BaseException:
            self.close()
            raise
        self.timings["boot"] = self.vm.boot_seconds
        self.timings["start (image, probe, boot)"] = round(time.monotonic() - start, 1)
        return self

    def close(self):
        _live.discard(self)
        self.vm.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def inventory(self, **capture_vars):
        common = {
            "ansible_python_interpreter": "/usr/bin/python3",
            "capture_backend": self.backend,
            "capture_inbound_interception_mode": "TPROXY",
            "capture_inbound_ports_include": "*",
            "capture_outbound_ip_ranges_include": "*",
            "capture_redirect_dns": True,
            "capture_capture_all_dns": True,
            "capture_enable_inbound_ipv6": True,
            **capture_vars,
        }
        return {"all": {"vars": common, "hosts": {"vm": {
            "ansible_host": vmctl.VM_V4, "ansible_user": "root",
            "ansible_ssh_common_args": "-F %s" % self.vm.path("ssh_config")}}}}

    def play(self, *args, timeout=1800, **capture_vars):
        """ansible-playbook --diff (the role on host vm) inside the VM's
        namespace, with the built collection only; returns the
        CompletedProcess with .recap and .seconds."""
        self.runs += 1
        run = self.dir / ("r%d" % self.runs)
        run.mkdir()
        (run / "inventory.json").write_text(json.dumps(self.inventory(**capture_vars)))
        (run / "site.yml").write_text(SITE)
        env = dict(os.environ, ANSIBLE_PIPELINING="true", ANSIBLE_SSH_CONTROL_PATH_DIR=str(run / "cp"),
                   ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="false")
        start = time.monotonic()
        proc = subprocess.run(self.vm.ns_argv(shell_env(self.collections) + [
            "ansible-playbook", "-i", str(run / "inventory.json"), "--diff", *args, str(run / "site.yml")]),
            cwd=run, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        proc.seconds = round(time.monotonic() - start, 1)
        proc.recap = recap(proc)
        (run / "output.txt").write_text(proc.stdout + proc.stderr)
        return proc

    def explain(self, proc) -> str:
        return "rc=%s recap=%s\n%s\n%s" % (proc.returncode, proc.recap, tail(proc.stdout, 80), tail(proc.stderr, 20))

    def snapshot(self) -> str:
        return vmcheck.snapshot(self.vm)

    def traffic(self, expect="captured"):
        return vmcheck.traffic(self.vm, expect)

    def unit(self):
        return vmcheck.unit_state(self.vm)

    def reboot(self):
        start = time.monotonic()
        self.vm.reboot()
        self.timings.setdefault("reboots", []).append(round(time.monotonic() - start, 1))
