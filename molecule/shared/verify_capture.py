"""Prove traffic capture in a network-namespace host with real connections.

Standard library only; run as root on the controller:

    .venv/bin/python verify_capture.py --host mcs-m-x-h --peer mcs-m-x-p --spec SPEC_JSON

It starts listeners inside the host namespace (``ip netns exec``): the
proxy's outbound port (15001, reads SO_ORIGINAL_DST), the inbound capture
port (15006; for TPROXY a transparent listener whose original destination is
its local address), the DNS port (15053, UDP and TCP) and the application
ports, and listeners on the peer's ports inside the peer namespace. Every
listener answers with one JSON line naming itself, so a client learns where
its connection landed. Then it runs the checks of the spec as clients, in the
host namespace (as the given uid/gid, via fork + setuid) or in the peer, and
prints one JSON document:

    {"ok": true, "checks": [{"name": ..., "landed": "outbound",
      "orig_dst": "203.0.113.7:80", "expect": "outbound", "ok": true, ...}]}

``landed`` is ``outbound`` (proxy port), ``inbound`` (inbound capture port),
``dns`` (DNS port), ``app:<port>`` (a host application port), ``peer:<port>``
(a peer listener) or ``none`` (no answer). The exit status is 0 when every
check met its expectation, 1 otherwise, 2 on usage or set-up errors.

SPEC keys (all optional but ``checks``): ``inbound_mode`` (REDIRECT or
TPROXY), ``proxy_port`` (15001), ``inbound_port`` (15006), ``dns_port``
(15053), ``proxy_uid`` (1337: the DNS listeners' socket owner), ``app_ports`` (host, [8080]), ``peer_ports`` ([9080]), ``timeout``
(seconds per connection, 2), and ``checks``: a list of ``{"name", "from":
"host"|"peer", "proto": "tcp"|"udp", "dst", "port", "uid", "gid", "expect",
"expect_orig_dst"}`` (``uid``/``gid`` only from the host; ``expect_orig_dst``
as ``ip:port`` or ``[ip6]:port``).

Every wait is bounded; every process this script starts is killed before it
exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST at SOL_IPV6 is 80 as well
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_PKTINFO = 8
SOL_IPV6 = socket.IPPROTO_IPV6
SERVER_LIFETIME = 60.0  # a listener process never outlives this
READY_TIMEOUT = 10.0


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sockaddr(addr) -> str:
    return fmt_addr(addr[0], addr[1])


def family_of(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------
# Inside a namespace: the listeners


def original_dst(conn: socket.socket, family: int) -> str | None:
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        else:
            raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    except OSError:
        return None  # not NATed
    return fmt_addr(host, struct.unpack_from("!H", raw, 2)[0])


def open_listener(spec: dict) -> socket.socket:
    family = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
    kind = socket.SOCK_DGRAM if spec["proto"] == "udp" else socket.SOCK_STREAM
    if spec.get("uid") is not None:
        # The socket is owned by uid (as the proxy's are: iptables owner
        # matches and istio's DNS conntrack zones apply to its packets).
        os.setegid(spec.get("gid", spec["uid"]))
        os.seteuid(spec["uid"])
        try:
            sock = socket.socket(family, kind)
        finally:
            os.seteuid(0)
            os.setegid(0)
    else:
        sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
    if spec.get("transparent"):
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    if kind == socket.SOCK_DGRAM:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
        else:
            sock.setsockopt(SOL_IPV6, socket.IPV6_RECVPKTINFO, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", spec["port"]))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    sock.setblocking(False)
    return sock


def answer_tcp(server: socket.socket, spec: dict) -> None:
    try:
        conn, peer = server.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(1.0)
        local = sockaddr(conn.getsockname())
        orig = local if spec.get("transparent") else original_dst(conn, server.family)
        report = {"banner": spec["banner"], "local": local, "peer": sockaddr(peer), "orig_dst": orig}
        try:
            conn.sendall((json.dumps(report) + "\n").encode())
        except OSError:
            pass


def answer_udp(server: socket.socket, spec: dict) -> None:
    try:
        data, ancdata, _flags, peer = server.recvmsg(4096, socket.CMSG_SPACE(64))
    except OSError:
        return
    arrived = next((cdata for _level, _type, cdata in ancdata), None)
    if arrived is None:
        return
    if server.family == socket.AF_INET:  # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}
        dst_raw = arrived[8:12]
        reply_from = (socket.SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, dst_raw, bytes(4)))
    else:  # struct in6_pktinfo {in6_addr addr; unsigned ifindex}
        dst_raw = arrived[:16]
        reply_from = (SOL_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", dst_raw, 0))
    local = fmt_addr(socket.inet_ntop(server.family, dst_raw), spec["port"])
    report = {"banner": spec["banner"], "local": local, "peer": sockaddr(peer), "orig_dst": None,
              "query": data.decode(errors="replace")[:64]}
    try:
        # Answer from the address the datagram arrived at, so that a NATed
        # (redirected) query gets its reply un-NATed by conntrack.
        server.sendmsg([(json.dumps(report) + "\n").encode()], [reply_from], 0, peer)
    except OSError:
        pass


def serve(params: dict) -> None:
    deadline = time.monotonic() + min(float(params.get("lifetime", SERVER_LIFETIME)), SERVER_LIFETIME)
    selector = selectors.DefaultSelector()
    for spec in params["listeners"]:
        try:
            sock = open_listener(spec)
        except OSError as exc:
            emit({"ready": False, "error": f"{spec['proto']} {spec['family']} port {spec['port']}: {exc}"})
            sys.exit(1)
        selector.register(sock, selectors.EVENT_READ, spec)
    selector.register(sys.stdin, selectors.EVENT_READ, None)  # parent closes stdin: stop
    emit({"ready": True})
    while (remaining := deadline - time.monotonic()) > 0:
        for key, _events in selector.select(remaining):
            if key.data is None:
                if not os.read(sys.stdin.fileno(), 4096):
                    return
                continue
            if key.data["proto"] == "udp":
                answer_udp(key.fileobj, key.data)
            else:
                answer_tcp(key.fileobj, key.data)


# --------------------------------------------------------------------------
# Inside a namespace: the clients


def run_check(check: dict, timeout: float) -> dict:
    """One client connection; runs in a forked child (may drop privileges)."""
    result = {"landed": "none", "orig_dst": None, "local": None, "client": None, "error": None}
    uid, gid = check.get("uid"), check.get("gid")
    if uid is not None or gid is not None:
        os.setgroups([])
        os.setgid(gid if gid is not None else uid)
        os.setuid(uid if uid is not None else os.getuid())
    kind = socket.SOCK_DGRAM if check.get("proto", "tcp") == "udp" else socket.SOCK_STREAM
    try:
        with socket.socket(family_of(check["dst"]), kind) as sock:
            sock.settimeout(timeout)
            sock.connect((check["dst"], int(check["port"])))
            result["client"] = sockaddr(sock.getsockname())
            if kind == socket.SOCK_DGRAM:
                sock.send(b"QUERY " + secrets.token_hex(4).encode())
                reply = sock.recv(65536)
            else:
                reply = b""
                while b"\n" not in reply and len(reply) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        report = json.loads(reply.decode())
        result.update(landed=report["banner"], orig_dst=report.get("orig_dst"), local=report.get("local"))
    except (OSError, ValueError, KeyError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def clients(params: dict) -> None:
    timeout = float(params.get("timeout", 2.0))
    children = {}
    for index, check in enumerate(params["checks"]):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(read_fd)
                os.write(write_fd, json.dumps(run_check(check, timeout)).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        children[read_fd] = (index, pid, b"")
    results = [None] * len(params["checks"])
    deadline = time.monotonic() + timeout + 3
    pending = dict(children)
    while pending and (remaining := deadline - time.monotonic()) > 0:
        ready, _w, _x = select.select(list(pending), [], [], remaining)
        for fd in ready:
            index, pid, data = pending[fd]
            chunk = os.read(fd, 65536)
            if chunk:
                pending[fd] = (index, pid, data + chunk)
                continue
            del pending[fd]
            try:
                results[index] = json.loads(data.decode())
            except ValueError:
                results[index] = {"landed": "none", "error": f"client crashed: {data[:200]!r}"}
    for fd, (index, pid, _data) in children.items():
        if fd in pending:
            results[index] = {"landed": "none", "error": "client did not finish in time"}
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        os.close(fd)
    emit({"results": results})


# --------------------------------------------------------------------------
# On the controller


class Server:
    """A listener process inside a namespace, ready once constructed."""

    def __init__(self, netns: str, listeners: list[dict]):
        argv = ["ip", "netns", "exec", netns, sys.executable, os.path.abspath(__file__), "serve",
                json.dumps({"listeners": listeners, "lifetime": SERVER_LIFETIME})]
        self.netns = netns
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _w, _x = select.select([self.proc.stdout], [], [], READY_TIMEOUT)
            line = self.proc.stdout.readline() if ready else b""
            status = json.loads(line) if line.strip() else {"ready": False, "error": "no answer"}
        except BaseException:
            self.close()
            raise
        if not status.get("ready"):
            self.close()
            raise RuntimeError(f"listeners in {netns} did not start: {status.get('error')} "
                               f"{self.proc.stderr.read().decode(errors='replace').strip()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


def run_clients(netns: str, checks: list[dict], timeout: float) -> list[dict]:
    if not checks:
        return []
    argv = ["ip", "netns", "exec", netns, sys.executable, os.path.abspath(__file__), "clients",
            json.dumps({"checks": checks, "timeout": timeout})]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"clients in {netns} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def listeners_of(spec: dict) -> tuple[list[dict], list[dict]]:
    tproxy = spec.get("inbound_mode", "REDIRECT") == "TPROXY"
    host, peer = [], []
    for family in (4, 6):
        host.append({"proto": "tcp", "family": family, "port": spec.get("proxy_port", 15001), "banner": "outbound"})
        host.append({"proto": "tcp", "family": family, "port": spec.get("inbound_port", 15006), "banner": "inbound",
                     "transparent": tproxy})
        for proto in ("tcp", "udp"):
            # The DNS agent runs as the proxy user: istio sends its answers
            # through conntrack zone 2 only when they come from that user.
            host.append({"proto": proto, "family": family, "port": spec.get("dns_port", 15053), "banner": "dns",
                         "uid": spec.get("proxy_uid", 1337)})
        for port in spec.get("app_ports", [8080]):
            host.append({"proto": "tcp", "family": family, "port": port, "banner": f"app:{port}"})
        for port in spec.get("peer_ports", [9080]):
            peer.append({"proto": "tcp", "family": family, "port": port, "banner": f"peer:{port}"})
    return host, peer


def judge(check: dict, result: dict) -> dict:
    out = {key: check.get(key) for key in ("name", "from", "proto", "uid", "expect", "expect_orig_dst")}
    out["proto"] = out["proto"] or "tcp"
    out["from"] = out["from"] or "host"
    out["dst"] = fmt_addr(check["dst"], int(check["port"]))
    out.update(result)
    problems = []
    if "expect" in check and result.get("landed") != check["expect"]:
        problems.append(f"landed on {result.get('landed')}, expected {check['expect']}")
    if check.get("expect_orig_dst") and result.get("orig_dst") != check["expect_orig_dst"]:
        problems.append(f"original destination {result.get('orig_dst')}, expected {check['expect_orig_dst']}")
    out["ok"] = not problems
    out["problems"] = problems
    return out


def main_run(args) -> int:
    spec = json.loads(args.spec)
    timeout = float(spec.get("timeout", 2.0))
    checks = spec["checks"]
    for check in checks:
        if check.get("from", "host") not in ("host", "peer"):
            raise ValueError(f"check {check.get('name')}: 'from' must be host or peer")
        if check.get("from") == "peer" and (check.get("uid") is not None or check.get("gid") is not None):
            raise ValueError(f"check {check.get('name')}: uid/gid only for checks from the host")
    host_listeners, peer_listeners = listeners_of(spec)
    servers = []
    try:
        servers.append(Server(args.host, host_listeners))
        servers.append(Server(args.peer, peer_listeners))
        by_ns = {"host": [], "peer": []}
        for index, check in enumerate(checks):
            by_ns[check.get("from", "host")].append(index)
        results = [None] * len(checks)
        for side, netns in (("host", args.host), ("peer", args.peer)):
            side_results = run_clients(netns, [checks[i] for i in by_ns[side]], timeout)
            for index, result in zip(by_ns[side], side_results):
                results[index] = result
    finally:
        for server in servers:
            server.close()
    judged = [judge(check, result) for check, result in zip(checks, results)]
    emit({"ok": all(item["ok"] for item in judged), "host": args.host, "peer": args.peer, "checks": judged})
    return 0 if all(item["ok"] for item in judged) else 1


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "serve":
        serve(json.loads(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "clients":
        clients(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--host", required=True, help="the captured host's network namespace")
    parser.add_argument("--peer", required=True, help="the peer's network namespace")
    parser.add_argument("--spec", required=True, help="the checks, as JSON (see the module docstring)")
    args = parser.parse_args(argv)
    for name in (args.host, args.peer):
        if not name.startswith("mcs-") or "/" in name:
            parser.error(f"refusing to use namespace {name!r}: not named mcs-*")
        if not os.path.exists(f"/run/netns/{name}"):
            parser.error(f"no network namespace {name!r}")
    try:
        return main_run(args)
    except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
