"""Hermetic network-namespace topologies for tests and benchmarks.

Standard library only. pytest gets it through tests/conftest.py (fixtures
``topology``, ``netns_factory``, ``host_and_peer``); a bench script does
``sys.path.insert(0, "<repo>/tests"); import netns``.

Namespaces are named ``mcs-<tag>-<random>`` and always deleted by name: by
their owner (``with``, ``delete()``, the pytest fixtures) and, as a last
resort, at interpreter exit for the names this process created. SIGTERM is
turned into KeyboardInterrupt (if nobody else handles it) so that clean-up
also runs when a test run is stopped.

Traffic probes run inside a namespace as ``python netns.py probe KIND JSON``
(this very file, with the caller's interpreter) and report JSON. Listeners
answer every connection or datagram with one JSON line, e.g.
``{"banner": "OUTBOUND15001", "peer": "192.0.2.10:41234",
"local": "127.0.0.1:15001", "orig_dst": "198.51.100.7:80"}``, so the client
learns where it landed. Addresses are ``ip:port`` / ``[ip6]:port`` strings
(see ``fmt_addr``). Everything has a timeout.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

PREFIX = "mcs-"
NETNS_DIR = Path("/run/netns")
DEFAULT_TIMEOUT = 30.0

HOST_V4, PEER_V4 = "192.0.2.10", "192.0.2.20"
HOST_V6, PEER_V6 = "2001:db8::10", "2001:db8::20"
HOST_ADDRS = (f"{HOST_V4}/24", f"{HOST_V6}/64")
PEER_ADDRS = (f"{PEER_V4}/24", f"{PEER_V6}/64")

# Socket options Python's socket module does not name (Linux values).
SO_ORIGINAL_DST = 80  # SOL_IP; IP6T_SO_ORIGINAL_DST at SOL_IPV6 is 80 too
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_PKTINFO = 8
SOL_IPV6 = socket.IPPROTO_IPV6

_live: dict[str, Netns] = {}  # namespaces this process created and has not deleted
_safety_net_installed = False


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 'ip' not found (run scripts/setup.sh)"
    return None


def fmt_addr(host: str, port: int) -> str:
    """``192.0.2.10:80`` or ``[2001:db8::10]:80``: the probes' address format."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class CommandError(subprocess.CalledProcessError):
    """A failed command; unlike CalledProcessError its message shows stderr."""

    def __str__(self) -> str:
        details = (self.stderr or self.stdout or "").strip()
        return f"{super().__str__()}\n{details}" if details else super().__str__()


def run(argv, *, check=True, input=None, timeout=DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command in the caller's namespace; text output captured."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


class Netns:
    """A network namespace: created (loopback up) on construction.

    ``delete()`` kills the processes inside and removes it; it is idempotent.
    Usable as a context manager.
    """

    def __init__(self, tag: str = "ns"):
        _install_safety_net()
        self.name = f"{PREFIX}{tag[:6]}-{secrets.token_hex(3)}"
        self._owner_pid = os.getpid()
        self._procs: list[subprocess.Popen] = []
        run(["ip", "netns", "add", self.name], timeout=10)
        _live[self.name] = self
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.delete()
            raise

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def exists(self) -> bool:
        return self.path.exists()

    def argv(self, argv) -> list[str]:
        """``argv`` prefixed with ``ip netns exec NAME``."""
        return ["ip", "netns", "exec", self.name, *(str(a) for a in argv)]

    def run(self, argv, *, check=True, input=None, timeout=DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace; text stdout/stderr captured."""
        return run(self.argv(argv), check=check, input=input, timeout=timeout)

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the namespace (stdin from /dev/null unless
        given); it is killed and reaped by ``delete()``."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self._procs.append(proc)
        return proc

    @staticmethod
    def _python_argv(code_or_script, args) -> list[str]:
        target = str(code_or_script)
        if isinstance(code_or_script, os.PathLike) or (target.endswith(".py") and os.path.isfile(target)):
            return [sys.executable, target, *args]
        return [sys.executable, "-c", target, *args]

    def python(self, code_or_script, args=(), *, check=True, input=None,
               timeout=DEFAULT_TIMEOUT) -> subprocess.CompletedProcess:
        """Run Python code (or a ``.py`` file) inside the namespace with this
        interpreter (``sys.executable``)."""
        return self.run(self._python_argv(code_or_script, args), check=check, input=input, timeout=timeout)

    def python_popen(self, code_or_script, args=(), **kwargs) -> subprocess.Popen:
        """Like ``python()`` but started in the background, see ``popen()``."""
        return self.popen(self._python_argv(code_or_script, args), **kwargs)

    def sysctl(self, key: str, value) -> None:
        """Set a sysctl inside the namespace (``net.ipv4.ip_forward`` or
        ``net/ipv4/conf/eth0.1/rp_filter`` form); writes /proc/sys directly,
        so procps need not be installed."""
        path = "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))
        self.run(["tee", path], input=f"{value}\n")

    def netns_id(self) -> str:
        """The namespace's identity as seen inside, e.g. ``net:[4026532281]``
        (compare with ``os.readlink("/proc/self/ns/net")``)."""
        return self.run(["readlink", "/proc/self/ns/net"]).stdout.strip()

    def delete(self) -> None:
        """Kill every process inside, then ``ip netns delete``; idempotent."""
        if self.exists():
            pids = run(["ip", "netns", "pids", self.name], check=False, timeout=10).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=5)  # reaps it and closes its pipes
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self.exists():
            run(["ip", "netns", "delete", self.name], timeout=10)
        _live.pop(self.name, None)


def veth(a: Netns, b: Netns, a_addrs=HOST_ADDRS, b_addrs=PEER_ADDRS, *,
         a_ifname: str = "eth0", b_ifname: str = "eth0", default_routes: bool = True) -> tuple[str, str]:
    """Connect ``a`` and ``b`` with a veth pair, addresses assigned (IPv6 with
    ``nodad``: usable at once), links up. With ``default_routes`` each side
    routes every address family it has via the other side's first address of
    that family. Returns the interface names (a side, b side)."""
    a.run(["ip", "link", "add", a_ifname, "type", "veth", "peer", "name", b_ifname, "netns", b.name])
    for ns, ifname, addrs in ((a, a_ifname, a_addrs), (b, b_ifname, b_addrs)):
        for addr in addrs:
            nodad = ["nodad"] if ipaddress.ip_interface(addr).version == 6 else []
            ns.run(["ip", "addr", "add", addr, "dev", ifname, *nodad])
        ns.run(["ip", "link", "set", ifname, "up"])
    if default_routes:
        for ns, ifname, other_addrs in ((a, a_ifname, b_addrs), (b, b_ifname, a_addrs)):
            gateways = {}
            for addr in other_addrs:
                ip = ipaddress.ip_interface(addr).ip
                gateways.setdefault(ip.version, str(ip))
            for version, gateway in gateways.items():
                ns.run(["ip", f"-{version}", "route", "add", "default", "via", gateway, "dev", ifname])
    return a_ifname, b_ifname


class Topology:
    """Namespaces that are deleted together (newest first), also when the
    ``with`` block fails."""

    def __init__(self):
        self.namespaces: list[Netns] = []

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def netns(self, tag: str = "ns") -> Netns:
        """Create a namespace owned by this topology."""
        ns = Netns(tag)
        self.namespaces.append(ns)
        return ns

    def host_and_peer(self) -> tuple[Netns, Netns]:
        """Two namespaces joined by veth: host eth0 192.0.2.10/24 +
        2001:db8::10/64, peer eth0 192.0.2.20/24 + 2001:db8::20/64, each
        with default routes via the other."""
        host, peer = self.netns("host"), self.netns("peer")
        veth(host, peer)
        return host, peer

    def close(self) -> None:
        """Delete every namespace; raises the first error after trying all."""
        errors = []
        while self.namespaces:
            try:
                self.namespaces.pop().delete()
            except Exception as exc:  # keep deleting the others
                errors.append(exc)
        if errors:
            raise errors[0]


def _delete_leftovers() -> None:
    for ns in list(_live.values()):
        if ns._owner_pid == os.getpid():
            try:
                ns.delete()
            except Exception as exc:  # report and go on with the others
                print(f"netns: could not delete {ns.name}: {exc}", file=sys.stderr)


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _install_safety_net() -> None:
    global _safety_net_installed
    if _safety_net_installed:
        return
    _safety_net_installed = True
    atexit.register(_delete_leftovers)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)


# --------------------------------------------------------------------------
# Traffic probes: the caller's side


class Listener:
    """A probe listener running inside a namespace, ready once constructed.

    ``result()`` waits for it to finish (after ``count`` connections or
    datagrams, or its timeout) and returns its report; leaving the ``with``
    block kills it if it still runs.
    """

    def __init__(self, ns: Netns, kind: str, params: dict, ready_timeout: float = 10.0):
        self.kind = kind
        self.proc = ns.python_popen(__file__, ["probe", kind, json.dumps(params)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._out = b""
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._out:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"{self.kind} listener not ready after {timeout}s")
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise RuntimeError(f"{self.kind} listener exited ({self.proc.returncode}) before ready: "
                                       f"{self.proc.stderr.read().decode(errors='replace').strip()}")
                self._out += chunk
        line, self._out = self._out.split(b"\n", 1)
        if not json.loads(line).get("ready"):
            raise RuntimeError(f"unexpected first line from {self.kind} listener: {line!r}")

    def result(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """The listener's report: ``{"connections": [...]}`` (TCP) or
        ``{"datagrams": [...]}`` (UDP), each item as sent to the client, plus
        ``"timed_out"`` (fewer than ``count`` arrived)."""
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.kind} listener failed ({self.proc.returncode}): "
                               f"{err.decode(errors='replace').strip()}")
        return json.loads((self._out + out).decode().strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.communicate(timeout=5)  # reaps it and closes its pipes
        except subprocess.TimeoutExpired:
            pass


class MarkedMonitor:
    """A monitor command (``ip monitor``, ``nft monitor``) inside a namespace,
    read between markers.

    ``mark()`` makes a marker change and returns the events seen since the
    previous mark (those the ``keep`` callable accepts): the events between
    two marks are every change made in that window. ``marker(serial)`` must
    return ``(argvs, is_end)``: the commands that make the marker change, and
    a predicate recognising the last event they cause.
    """

    def __init__(self, ns: Netns, argv, marker, keep=lambda line: True):
        self.ns, self.marker, self.keep = ns, marker, keep
        self.proc = ns.popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.serial = 0
        for _attempt in range(100):  # repeat the first marker until the monitor is subscribed
            if self.mark(timeout=0.1) is not None:
                return
        self.close()
        raise TimeoutError(f"{argv[0]} monitor saw no marker")

    def mark(self, timeout: float = 5.0) -> list[str] | None:
        """The kept events since the previous mark, or None on timeout."""
        self.serial += 1
        argvs, is_end = self.marker(self.serial)
        for argv in argvs:
            self.ns.run(argv)
        events, deadline = [], time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                line = line.decode().strip()
                if is_end(line):
                    return [e for e in events if e and self.keep(e)]
                events.append(line)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.selector.select(remaining):
                return None
            self.buffer += os.read(self.proc.stdout.fileno(), 65536)

    def close(self) -> None:
        self.selector.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def tcp_listener(ns: Netns, port: int, family: int = 4, *, transparent: bool = False, count: int = 1,
                 banner: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 uid: int | None = None, gid: int | None = None) -> Listener:
    """Start a TCP listener on the wildcard address of ``family`` (4 or 6;
    IPv6 is v6-only) inside ``ns``. It reports per connection the peer, the
    local address and the original destination: ``SO_ORIGINAL_DST`` (None
    when conntrack has no entry), or for a ``transparent`` (TPROXY) listener
    the local address. ``banner`` defaults to ``TCP<port>``. With
    ``uid``/``gid`` it runs as that user, as Envoy runs as the proxy user
    (a transparent listener binds as root first, for IP_TRANSPARENT)."""
    return Listener(ns, "tcp_listener", {"port": port, "family": family, "transparent": transparent,
                                         "count": count, "banner": banner or f"TCP{port}", "timeout": timeout,
                                         "uid": uid, "gid": gid})


def udp_dns_listener(ns: Netns, port: int = 53, family: int = 4, *, count: int = 1,
                     banner: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                     uid: int | None = None, gid: int | None = None) -> Listener:
    """Start a UDP listener on the wildcard address inside ``ns`` that answers
    each datagram (from the address it arrived at, so NATed replies are
    un-NATed) with a report: peer, local (post-NAT destination) and the
    query text. ``banner`` defaults to ``UDP<port>``. With ``uid``/``gid``
    it runs as that user: Istio's DNS conntrack zones only un-NAT replies
    sent from port 15053 by a socket of the proxy user (1337)."""
    return Listener(ns, "udp_listener", {"port": port, "family": family, "count": count,
                                         "banner": banner or f"UDP{port}", "timeout": timeout,
                                         "uid": uid, "gid": gid})


def _client(ns: Netns, kind: str, params: dict, timeout: float) -> dict:
    proc = ns.python(__file__, ["probe", kind, json.dumps({**params, "timeout": timeout})], timeout=timeout + 15)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tcp_connect(ns: Netns, dst: str, port: int, *, uid: int | None = None, gid: int | None = None,
                groups: list[int] | None = None, src: str | None = None, timeout: float = 5.0) -> dict:
    """Connect from inside ``ns`` (as ``uid``/``gid`` with supplementary
    ``groups``, default none, when given; from ``src`` when given) and read
    the listener's answer. Returns ``{"ok", "error", "client"}`` plus, when
    ok, the listener's report (``banner``, ``peer``, ``local``,
    ``orig_dst``)."""
    return _client(ns, "tcp_connect", {"dst": dst, "port": port, "uid": uid, "gid": gid,
                                       "groups": groups, "src": src}, timeout)


def udp_query(ns: Netns, dst: str, port: int = 53, *, uid: int | None = None, gid: int | None = None,
              groups: list[int] | None = None, src: str | None = None, payload: str = "QUERY",
              timeout: float = 5.0) -> dict:
    """Send one datagram from inside ``ns`` on a connected UDP socket (so
    only a reply from ``dst``:``port`` counts) and read the answer; result
    as for ``tcp_connect`` (the report has ``query`` instead of
    ``orig_dst``)."""
    return _client(ns, "udp_query", {"dst": dst, "port": port, "uid": uid, "gid": gid, "groups": groups,
                                     "src": src, "payload": payload}, timeout)


# --------------------------------------------------------------------------
# Traffic probes: the side that runs inside the namespace


def _emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def _sockaddr(addr) -> str:
    return fmt_addr(addr[0], addr[1])


def socket_family(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def pktinfo_reply(family: int, pktinfo: bytes, port: int) -> tuple[str, tuple]:
    """(address:port a datagram arrived at, the ancillary item that sends a reply from it) of the
    IP_PKTINFO / IPV6_PKTINFO data received with the datagram."""
    if family == 4:  # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}
        dst_raw = pktinfo[8:12]
        reply_info = (socket.SOL_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, dst_raw, bytes(4)))
    else:  # struct in6_pktinfo {in6_addr addr; unsigned ifindex}
        dst_raw = pktinfo[:16]
        reply_info = (SOL_IPV6, socket.IPV6_PKTINFO, struct.pack("=16sI", dst_raw, 0))
    return fmt_addr(socket.inet_ntop(socket_family(family), dst_raw), port), reply_info


def _server_socket(kind: int, family: int, port: int, options=()) -> socket.socket:
    sock = socket.socket(socket_family(family), kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == 6:
        sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
    for level, option in options:
        sock.setsockopt(level, option, 1)
    sock.bind(("0.0.0.0" if family == 4 else "::", port))
    return sock


def original_dst(conn: socket.socket, family: int) -> str | None:
    try:
        if family == 4:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
        else:
            raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    except OSError:  # no conntrack entry
        return None
    return fmt_addr(host, struct.unpack_from("!H", raw, 2)[0])


def _probe_tcp_listener(port, family, transparent, count, banner, timeout, uid=None, gid=None):
    deadline = time.monotonic() + timeout
    options = [(socket.SOL_IP, IP_TRANSPARENT) if family == 4 else (SOL_IPV6, IPV6_TRANSPARENT)] if transparent else []
    connections = []
    if not transparent:  # -m owner matches the uid a socket was created with
        _drop_privileges(uid, gid, [])
    with _server_socket(socket.SOCK_STREAM, family, port, options) as server:
        server.listen(64)
        _drop_privileges(uid, gid, [])  # IP_TRANSPARENT needed CAP_NET_ADMIN until here
        _emit({"ready": True})
        while len(connections) < count and (remaining := deadline - time.monotonic()) > 0:
            server.settimeout(remaining)
            try:
                conn, peer = server.accept()
            except TimeoutError:
                break
            with conn:
                local = _sockaddr(conn.getsockname())
                report = {"banner": banner, "peer": _sockaddr(peer), "local": local,
                          "orig_dst": local if transparent else original_dst(conn, family)}
                connections.append(report)
                conn.settimeout(2)
                try:
                    conn.sendall((json.dumps(report) + "\n").encode())
                except OSError:
                    pass  # the client went away; the report still counts
    _emit({"connections": connections, "timed_out": len(connections) < count})


def _probe_udp_listener(port, family, count, banner, timeout, uid=None, gid=None):
    deadline = time.monotonic() + timeout
    pktinfo = (socket.SOL_IP, IP_PKTINFO) if family == 4 else (SOL_IPV6, socket.IPV6_RECVPKTINFO)
    datagrams = []
    _drop_privileges(uid, gid, [])  # -m owner matches the uid a socket was created with
    with _server_socket(socket.SOCK_DGRAM, family, port, [pktinfo]) as server:
        _emit({"ready": True})
        while len(datagrams) < count and (remaining := deadline - time.monotonic()) > 0:
            server.settimeout(remaining)
            try:
                data, ancdata, _flags, peer = server.recvmsg(4096, socket.CMSG_SPACE(32))
            except TimeoutError:
                break
            local, reply_info = pktinfo_reply(family, next(cmsg_data for _level, _type, cmsg_data in ancdata), port)
            report = {"banner": banner, "peer": _sockaddr(peer), "local": local,
                      "query": data.decode(errors="replace")}
            datagrams.append(report)
            try:
                server.sendmsg([(json.dumps(report) + "\n").encode()], [reply_info], 0, peer)
            except OSError:
                pass  # unroutable reply; the report still counts
    _emit({"datagrams": datagrams, "timed_out": len(datagrams) < count})


def _drop_privileges(uid, gid, groups) -> None:
    if (uid is None and gid is None) or (os.getuid(), os.getgid()) == (uid, gid):
        return
    os.setgroups(groups or [])
    if gid is not None:
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def _client_socket(kind, dst, src, timeout) -> socket.socket:
    sock = socket.socket(socket_family(ipaddress.ip_address(dst).version), kind)
    sock.settimeout(timeout)
    if src:
        sock.bind((src, 0))
    return sock


def _probe_client(kind, dst, port, uid, gid, groups, src, timeout, payload=None):
    _drop_privileges(uid, gid, groups)
    result = {"ok": False, "error": None, "client": None}
    try:
        with _client_socket(kind, dst, src, timeout) as sock:
            sock.connect((dst, port))
            result["client"] = _sockaddr(sock.getsockname())
            if kind == socket.SOCK_DGRAM:
                sock.send(payload.encode())
                reply = sock.recv(65536)
            else:
                reply = b""
                while b"\n" not in reply and len(reply) < 65536 and (chunk := sock.recv(4096)):
                    reply += chunk
        result.update(json.loads(reply.decode()))
        result["ok"] = True
    except (OSError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    _emit(result)


def _probe_tcp_connect(**params):
    _probe_client(socket.SOCK_STREAM, **params)


def _probe_udp_query(**params):
    _probe_client(socket.SOCK_DGRAM, **params)


_PROBES = {
    "tcp_listener": _probe_tcp_listener,
    "udp_listener": _probe_udp_listener,
    "tcp_connect": _probe_tcp_connect,
    "udp_query": _probe_udp_query,
}


def _main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] != "probe" or argv[1] not in _PROBES:
        sys.exit(f"usage: {sys.argv[0]} probe {{{','.join(_PROBES)}}} JSON_PARAMS")
    _PROBES[argv[1]](**json.loads(argv[2]))


if __name__ == "__main__":
    _main(sys.argv[1:])
