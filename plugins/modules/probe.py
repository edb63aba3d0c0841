#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: meshcapture.sidecar contributors
# Apache License 2.0 (see LICENSE)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: probe
short_description: Prove with a real connection that outbound traffic is captured to the proxy port
version_added: 0.1.0
description:
  - Validates an applied capture the way C(istio-iptables --run-validation) does, with a real TCP connection
    on the target.
  - Binds a temporary TCP listener on O(port) (the proxy's outbound port), then, from a child process running
    as O(uid)/O(gid) (a user whose traffic must be captured, not the proxy's), connects to O(dest):O(dest_port).
    When the capture works, the connection lands on the listener, which reads its original destination
    (C(SO_ORIGINAL_DST)).
  - Fails, without changing anything, when the connection does not land on the listener, when its original
    destination is not O(dest):O(dest_port), or when O(port) is already taken (a proxy such as Envoy already
    listens there; the probe needs the port for itself).
  - Every wait is bounded by O(timeout); the child process is always reaped, and killed if needed.
author:
  - meshcapture maintainers (@meshcapture)
options:
  port:
    description: The port the capture redirects outbound traffic to (the rules' C(proxy_port)).
    type: int
    default: 15001
  dest:
    description:
      - The address to connect to; the capture must redirect traffic to it. IPv4 or IPv6.
      - Default is the first address of the first range of O(outbound_ip_ranges_include) (the address itself
        for a C(/32) or C(/128)), or C(203.0.113.1) when that is V(*).
    type: str
  outbound_ip_ranges_include:
    description:
      - The captured destination ranges (the rules' C(outbound_ip_ranges_include)), used to choose O(dest) when
        it is not given. Comma-separated strings are accepted.
    type: list
    elements: str
    default: []
  dest_port:
    description: The destination port to connect to.
    type: int
    default: 80
  uid:
    description: User ID the connecting child process runs as. Must not be one of the proxy's (not captured).
    type: int
    default: 65534
  gid:
    description: Group ID the connecting child process runs as (no supplementary groups).
    type: int
    default: 65534
  timeout:
    description: Seconds to wait for the connection; the whole probe takes at most about twice as long.
    type: float
    default: 3.0
  expect_captured:
    description:
      - V(true) fails the task when the connection is not captured. V(false) only reports RV(captured),
        for example to prove that a removed capture is gone.
    type: bool
    default: true
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
    support: none
    details: The probe needs a real connection through the applied rules; it is skipped in check mode.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  platform:
    description: Target OS/families that can be operated against.
    support: N/A
    platforms: linux
notes:
  - Needs root on the target, to switch the child to O(uid).
  - The destination needs a route on the target (any route will do, the connection is redirected before it
    leaves the host), otherwise the connection fails with C(Network is unreachable) before the capture can act.
  - While the probe runs (at most O(timeout) seconds), other connections captured to O(port) are accepted and
    closed.
seealso:
  - module: meshcapture.sidecar.rules
  - name: istio-iptables validation
    description: Istio's own post-install check (C(--run-validation)).
    link: https://istio.io/latest/docs/setup/additional-setup/cni/#race-condition--mitigation
"""

EXAMPLES = r"""
- name: Prove that outbound traffic reaches the proxy port
  meshcapture.sidecar.probe:
    port: 15001
    outbound_ip_ranges_include: '*'

- name: Prove that a removed capture is gone
  meshcapture.sidecar.probe:
    dest: 203.0.113.1
    expect_captured: false
  register: probe

- name: Show it
  ansible.builtin.debug:
    msg: "captured={{ probe.captured }}"
"""

RETURN = r"""
captured:
  description: Whether the connection landed on the listener with the expected original destination.
  returned: always
  type: bool
  sample: true
landed:
  description: Whether the connection reached the listener at all.
  returned: always
  type: bool
  sample: true
original_dst:
  description: The original destination the listener read from the captured connection (C(SO_ORIGINAL_DST)).
  returned: always
  type: str
  sample: 203.0.113.1:80
dest:
  description: The destination the probe connected to, as C(ip:port) or C([ip6]:port).
  returned: always
  type: str
  sample: 203.0.113.1:80
listener:
  description: The listener's address.
  returned: always
  type: str
  sample: 0.0.0.0:15001
client_error:
  description: Why the client's connection failed, if it did.
  returned: always
  type: str
  sample: "timed out"
"""

import errno
import ipaddress
import json
import os
import secrets
import select
import signal
import socket
import struct
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.text.converters import to_text

SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST at SOL_IPV6 has the same value
DEFAULT_DEST = "203.0.113.1"


def fmt_addr(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def choose_dest(ranges):
    """First address of the first captured range, or the documentation address for '*'."""
    items = [item.strip() for item in ranges if item and item.strip()]
    if not items or items[0] == "*":
        return DEFAULT_DEST if items else None
    network = ipaddress.ip_network(items[0], strict=False)
    if network.num_addresses <= 2:
        return str(network.network_address)
    return str(network.network_address + 1)


def original_dst(conn, family):
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        else:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    except OSError:
        return None  # not NATed: no conntrack entry
    return fmt_addr(host, struct.unpack_from("!H", raw, 2)[0])


def run_client(family, dest, dest_port, uid, gid, token, timeout, report_fd):
    """The child: drop to uid/gid, connect, send the token. Never returns."""
    status = 1
    try:
        error = ""
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect((dest, dest_port))
                sock.sendall(token + b"\n")
                sock.recv(64)
                status = 0
            finally:
                sock.close()
        except (OSError, socket.timeout) as exc:
            error = "%s: %s" % (type(exc).__name__, exc)
        os.write(report_fd, json.dumps({"error": error}).encode())
    finally:
        os._exit(status)


def accept_probe(server, family, token, deadline):
    """Wait for the connection carrying token; return its original destination, or (False, None)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, None
        ready, dummy, dummy = select.select([server], [], [], remaining)
        if not ready:
            return False, None
        try:
            conn, dummy = server.accept()
        except OSError:
            continue
        try:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while b"\n" not in data and len(data) < 256:
                chunk = conn.recv(256)
                if not chunk:
                    break
                data += chunk
            if data.strip() == token:
                orig = original_dst(conn, family)
                try:
                    conn.sendall(b"ok\n")
                except OSError:
                    pass
                return True, orig
        except (OSError, socket.timeout):
            pass
        finally:
            conn.close()


def reap(pid, deadline):
    """Wait for the child until deadline, then kill it."""
    while time.monotonic() < deadline:
        done, dummy = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os.waitpid(pid, 0)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            port=dict(type="int", default=15001),
            dest=dict(type="str"),
            outbound_ip_ranges_include=dict(type="list", elements="str", default=[]),
            dest_port=dict(type="int", default=80),
            uid=dict(type="int", default=65534),
            gid=dict(type="int", default=65534),
            timeout=dict(type="float", default=3.0),
            expect_captured=dict(type="bool", default=True),
        ),
        supports_check_mode=False,
    )
    p = module.params
    for name in ("port", "dest_port"):
        if not 1 <= p[name] <= 65535:
            module.fail_json(msg="%s must be a port number between 1 and 65535, got %d" % (name, p[name]))
    if not 0 < p["timeout"] <= 60:
        module.fail_json(msg="timeout must be more than 0 and at most 60 seconds, got %s" % p["timeout"])
    if os.geteuid() != 0:
        module.fail_json(msg="the probe needs root on the target (it switches its client to uid %d)" % p["uid"])

    dest = p["dest"]
    if not dest:
        try:
            dest = choose_dest(p["outbound_ip_ranges_include"])
        except ValueError as exc:
            module.fail_json(msg="cannot choose a destination from outbound_ip_ranges_include: %s" % exc)
        if dest is None:
            module.fail_json(msg="no destination to probe: outbound_ip_ranges_include is empty, so no address is "
                                 "known to be captured; set dest")
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(dest).version == 6 else socket.AF_INET
    except ValueError:
        module.fail_json(msg="dest must be an IPv4 or IPv6 address, got %r" % dest)

    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    result = dict(changed=False, captured=False, landed=False, original_dst=None,
                  dest=fmt_addr(dest, p["dest_port"]), listener=fmt_addr(wildcard, p["port"]), client_error="")

    server = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: TIME_WAIT leftovers of an earlier probe do not block the port, a listener does.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            server.bind((wildcard, p["port"]))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                module.fail_json(msg="port %d is already in use on the target, so the probe cannot listen there: is "
                                     "the proxy (Envoy) already running? Stop it, or run without validation"
                                     % p["port"], **result)
            module.fail_json(msg="cannot listen on %s: %s" % (result["listener"], exc), **result)
        server.listen(16)

        token = secrets.token_hex(16).encode()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            server.close()
            run_client(family, dest, p["dest_port"], p["uid"], p["gid"], token, p["timeout"], write_fd)
        os.close(write_fd)
        try:
            deadline = time.monotonic() + p["timeout"]
            landed, orig = accept_probe(server, family, token, deadline)
            reap(pid, time.monotonic() + p["timeout"] + 1)
            ready, dummy, dummy = select.select([read_fd], [], [], 0)
            report = os.read(read_fd, 65536) if ready else b""
        finally:
            os.close(read_fd)
    finally:
        server.close()

    try:
        result["client_error"] = json.loads(to_text(report))["error"] if report else "no report from the client"
    except ValueError:
        result["client_error"] = to_text(report)
    result["landed"] = landed
    result["original_dst"] = orig
    result["captured"] = bool(landed and orig == result["dest"])
    if p["expect_captured"] and not result["captured"]:
        if landed:
            why = "it landed on port %d, but with original destination %s" % (p["port"], orig)
        else:
            why = "it did not reach port %d within %ss%s" % (
                p["port"], p["timeout"], " (client: %s)" % result["client_error"] if result["client_error"] else "")
        module.fail_json(msg="outbound capture does not work: a connection as uid %d to %s was not captured: %s"
                             % (p["uid"], result["dest"], why), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
