"""Many probes per process: a listener set and a batch client.

tests/netns.py starts one Python process per listener and per connection,
which is right for a handful of probes; a parity run sends hundreds.  Here
one ``serve`` process inside a namespace binds every listener of a spec and
answers each TCP connection / UDP datagram with one JSON line (its banner,
the local address and the original destination: SO_ORIGINAL_DST, which for
a non-NATed (e.g. TPROXY) connection is the local address itself), and one
``probe`` process runs a list of probes, one after the other, each from a
socket created with the probe's uid/gid (the owner match reads the
creator's credentials), and prints all results as one JSON list.

Standard library only; run as ``python probe_batch.py serve|probe JSON``
inside a namespace (see start_listeners / run_probes).
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import subprocess
import sys
import time

import netns
from netns import (IP_PKTINFO, IP_TRANSPARENT, IPV6_TRANSPARENT, SOL_IPV6, fmt_addr, original_dst, pktinfo_reply,
                   socket_family)


# ----------------------------------------------------------- caller side
class Listeners:
    """A ``serve`` process inside ``ns``; ready once constructed, killed by close()."""

    def __init__(self, ns: netns.Netns, tcp=(), udp=(), timeout: float = 120.0):
        spec = {"tcp": [dict(t) for t in tcp], "udp": [dict(u) for u in udp], "timeout": timeout}
        self.proc = ns.python_popen(__file__, ["serve", json.dumps(spec)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            self.close()
            raise RuntimeError(f"listeners not ready: {line!r} {self.proc.stderr.read().decode(errors='replace')}")

    def __enter__(self) -> Listeners:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=5)


def listener(port: int, family: int, banner: str, *, transparent=False, uid=None, gid=None) -> dict:
    """One listener of a spec (bound to the wildcard address of ``family``)."""
    return {"port": port, "family": family, "banner": banner, "transparent": transparent, "uid": uid, "gid": gid}


def run_probes(ns: netns.Netns, probes: list[dict], timeout: float = 2.0) -> list[dict]:
    """Run the probes (dicts: proto tcp|udp, dst, port, uid, gid, src) inside ``ns``
    one after the other; one result per probe: ``{"ok": True, "banner", "local",
    "orig_dst"}`` or ``{"ok": False, "error": "timeout" | errno name}``."""
    budget = timeout * len(probes) + 30
    proc = ns.python(__file__, ["probe", json.dumps({"probes": probes, "timeout": timeout})], timeout=budget)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------ namespace side
def _as(uid, gid):
    """Context for creating a socket with other credentials (effective ids only)."""
    class _Creds:
        def __enter__(self):
            if gid is not None:
                os.setegid(gid)
            if uid is not None:
                os.seteuid(uid)

        def __exit__(self, *exc):
            os.seteuid(0)
            os.setegid(0)
    return _Creds()


def _bind(kind, spec) -> socket.socket:
    family = spec["family"]
    with _as(spec.get("uid"), spec.get("gid")):
        sock = socket.socket(socket_family(family), kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == 6:
        sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
    if spec.get("transparent"):
        sock.setsockopt(*((socket.SOL_IP, IP_TRANSPARENT) if family == 4 else (SOL_IPV6, IPV6_TRANSPARENT)), 1)
    if kind == socket.SOCK_DGRAM:
        sock.setsockopt(*((socket.SOL_IP, IP_PKTINFO) if family == 4 else (SOL_IPV6, socket.IPV6_RECVPKTINFO)), 1)
    sock.bind(("0.0.0.0" if family == 4 else "::", spec["port"]))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)
    return sock


def _answer_tcp(server, spec):
    try:
        conn, peer = server.accept()
    except OSError:
        return
    with conn:
        local = conn.getsockname()
        local = fmt_addr(local[0], local[1])
        report = {"banner": spec["banner"], "local": local,
                  "orig_dst": original_dst(conn, spec["family"]) or local}
        conn.settimeout(2)
        try:
            conn.sendall((json.dumps(report) + "\n").encode())
        except OSError:
            pass


def _answer_udp(server, spec):
    family = spec["family"]
    try:
        data, ancdata, _flags, peer = server.recvmsg(4096, socket.CMSG_SPACE(32))
    except OSError:
        return
    raw = next((d for _level, _type, d in ancdata), None)
    if raw is None:
        return
    local, info = pktinfo_reply(family, raw, spec["port"])
    report = {"banner": spec["banner"], "local": local, "orig_dst": local}
    try:
        server.sendmsg([(json.dumps(report) + "\n").encode()], [info], 0, peer)
    except OSError:
        pass


def _serve(tcp, udp, timeout):
    selector = selectors.DefaultSelector()
    for kind, specs, handler in ((socket.SOCK_STREAM, tcp, _answer_tcp), (socket.SOCK_DGRAM, udp, _answer_udp)):
        for spec in specs:
            selector.register(_bind(kind, spec), selectors.EVENT_READ, (handler, spec))
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        for key, _events in selector.select(remaining):
            handler, spec = key.data
            handler(key.fileobj, spec)


def _one_probe(probe, timeout):
    family = 6 if ":" in probe["dst"] else 4
    kind = socket.SOCK_STREAM if probe["proto"] == "tcp" else socket.SOCK_DGRAM
    with _as(probe.get("uid"), probe.get("gid")):
        sock = socket.socket(socket_family(family), kind)
    with sock:
        sock.settimeout(timeout)
        try:
            if probe.get("src"):
                sock.bind((probe["src"], 0))
            sock.connect((probe["dst"], probe["port"]))
            if kind == socket.SOCK_DGRAM:
                sock.send(b"QUERY")
                reply = sock.recv(65536)
            else:
                reply = b""
                while b"\n" not in reply and (chunk := sock.recv(4096)):
                    reply += chunk
            return {"ok": True, **json.loads(reply.decode())}
        except socket.timeout:
            return {"ok": False, "error": "timeout"}
        except (OSError, ValueError) as exc:
            name = errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)
            return {"ok": False, "error": name}


def _probe(probes, timeout):
    os.setgroups([])
    print(json.dumps([_one_probe(p, timeout) for p in probes]), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("serve", "probe"):
        sys.exit(f"usage: {sys.argv[0]} serve|probe JSON")
    params = json.loads(sys.argv[2])
    if sys.argv[1] == "serve":
        _serve(params["tcp"], params["udp"], params["timeout"])
    else:
        _probe(params["probes"], params["timeout"])
