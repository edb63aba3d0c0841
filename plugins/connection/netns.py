# -*- coding: utf-8 -*-
# Copyright (c) meshcapture maintainers
# Apache License 2.0 (see galaxy.yml)

from __future__ import annotations

DOCUMENTATION = r"""
name: netns
author: meshcapture maintainers (@meshcapture)
short_description: Run tasks inside a Linux network namespace on the controller
version_added: 0.1.0
description:
  - Runs every task, C(raw) included, inside an existing named network namespace
    on the Ansible controller, as C(ip netns exec NAME /bin/sh -c COMMAND).
  - The namespace shares the controller's file systems; only the network stack
    differs (and C(/etc/netns/NAME/*) overlays the matching files in C(/etc), as
    usual for C(ip netns exec)). Files are transferred through the namespace, so
    tasks see the same files that modules see.
  - Meant for hermetic tests and demos of network changes (iptables, routes,
    TPROXY) that must not touch the controller's own network.
  - Needs root on the controller. Create the namespace first (C(ip netns add NAME)).
  - Modules run with the controller's own Python installations; set
    C(ansible_python_interpreter) to one of them.
options:
  netns_name:
    description:
      - Name of the network namespace, as listed by C(ip netns list) (a file in C(/run/netns)).
      - Taken from C(ansible_netns_name), else C(ansible_host), else the inventory hostname.
    type: string
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: ansible_netns_name
  ip_executable:
    description:
      - The iproute2 C(ip) binary; a bare name is looked up in C(PATH) and the sbin directories.
    type: string
    default: ip
    ini:
      - section: netns_connection
        key: ip_executable
    env:
      - name: ANSIBLE_NETNS_IP_EXECUTABLE
    vars:
      - name: ansible_netns_ip_executable
notes:
  - Pipelining is not used; modules are copied to the remote temporary directory,
    which is on the controller's file system.
"""

EXAMPLES = r"""
# inventory.yml
# all:
#   hosts:
#     demo:
#       ansible_host: mcs-demo            # created with: ip netns add mcs-demo
#       ansible_connection: meshcapture.sidecar.netns
#       ansible_python_interpreter: /usr/bin/python3

- name: Show the namespace's addresses
  hosts: demo
  gather_facts: false
  tasks:
    - name: Runs inside the namespace, like every other task
      ansible.builtin.raw: ip -brief address
      changed_when: false
"""

import os
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.process import get_bin_path
from ansible.module_utils.common.text.converters import to_bytes
from ansible.plugins.connection import BUFSIZE, ConnectionBase
from ansible.utils.display import Display

display = Display()

NETNS_DIR = "/run/netns"


class Connection(ConnectionBase):
    """Local connection whose commands run in a named network namespace."""

    transport = "meshcapture.sidecar.netns"
    has_pipelining = False
    has_tty = False

    def _connect(self):
        """Check root, the ip binary and that the namespace exists."""
        if self._connected:
            return self
        name = self.get_option("netns_name")
        if not name or "/" in name or name in (".", ".."):
            raise AnsibleConnectionFailure(f"invalid network namespace name {name!r}")
        if os.geteuid() != 0:
            raise AnsibleConnectionFailure("the netns connection needs root on the controller (ip netns exec)")
        if not os.path.exists(os.path.join(NETNS_DIR, name)):
            raise AnsibleConnectionFailure(
                f"network namespace {name!r} does not exist (no {NETNS_DIR}/{name}); create it with: ip netns add {name}")
        ip = self.get_option("ip_executable")
        try:
            self._ip = ip if os.path.isabs(ip) else get_bin_path(ip)
        except ValueError as exc:
            raise AnsibleConnectionFailure(f"cannot find the ip executable: {exc}") from exc
        self._netns = name
        display.vvv(f"ESTABLISHED NETNS CONNECTION TO {name}", host=name)
        self._connected = True
        return self

    def _popen(self, argv, stdin=subprocess.PIPE):
        """Start ``argv`` inside the namespace with stdout/stderr piped."""
        local_cmd = [self._ip, "netns", "exec", self._netns, *argv]
        display.vvv(f"EXEC {local_cmd}", host=self._netns)
        return subprocess.Popen([to_bytes(a, errors="surrogate_or_strict") for a in local_cmd],
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def exec_command(self, cmd, in_data=None, sudoable=False):
        """Run ``cmd`` with /bin/sh inside the namespace."""
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        proc = self._popen(["/bin/sh", "-c", cmd])
        stdout, stderr = proc.communicate(in_data)
        return proc.returncode, stdout, stderr

    def put_file(self, in_path, out_path):
        """Copy a controller file to ``out_path`` as seen inside the namespace."""
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._netns)
        b_in_path = to_bytes(in_path, errors="surrogate_or_strict")
        if not os.path.exists(b_in_path):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with open(b_in_path, "rb") as in_file:
            proc = self._popen(["/bin/sh", "-c", 'cat > "$1"', "sh", out_path], stdin=in_file)
            stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise AnsibleError(f"failed to transfer {in_path} to {out_path}:\n{stdout!r}\n{stderr!r}")

    def fetch_file(self, in_path, out_path):
        """Copy ``in_path`` as seen inside the namespace to the controller."""
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._netns)
        proc = self._popen(["/bin/sh", "-c", 'cat -- "$1"', "sh", in_path], stdin=subprocess.DEVNULL)
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as out_file:
            while chunk := proc.stdout.read(BUFSIZE):
                out_file.write(chunk)
        stderr = proc.stderr.read()
        proc.wait()
        if proc.returncode != 0:
            raise AnsibleError(f"failed to transfer {in_path} to {out_path}:\n{stderr!r}")

    def close(self):
        """Nothing to tear down: each command is its own process."""
        super().close()
        self._connected = False
