"""Real traffic through each Istio release's capture, applied by the rules module.

Standard library only; import it like tests/netns.py (tests/ is on
sys.path).  A check is a configuration of the rules module plus the probes
it must steer, each with where it has to land: which listener answered
(probe_batch banners: ``host:15001`` Envoy outbound, ``host:15006`` Envoy
inbound, ``host:15053`` the agent's DNS proxy, ``host:P`` / ``peer:P`` an
app or resolver) and, where it matters, the original destination or the
local address the listener saw.  The landing places are the same for every
release and backend: what the releases changed does not move these probes.

Topology (``build``): netns.Topology's host 192.0.2.10 / 2001:db8::10 and
peer 192.0.2.20 / 2001:db8::20; the peer holds the services 198.51.100.7 /
2001:db8:ffff::7, the excluded addresses 198.51.100.200 / 2001:db8:fffe::9
(on lo) and the resolvers 192.0.2.53 / 2001:db8::53 (on eth0); the host
has the TPROXY policy routing of meshcapture.sidecar.routes.
"""

from __future__ import annotations

from module_runner import run_module
from netns import HOST_V4, HOST_V6, PEER_V4, PEER_V6, fmt_addr
from probe_batch import Listeners, listener, run_probes
from rules_helpers import apply, ok

# Every release the rules module renders (istio_version; 1.19 = 1.18, 1.29/1.30 = 1.28).
RELEASES = ("1.17", "1.18", "1.20", "1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27", "1.28")
BACKENDS = ("iptables-nft", "nftables")

APP, PROXY, OTHER_GROUP = 1000, 1337, 4242
ADDR = {
    4: dict(host=HOST_V4, peer=PEER_V4, service="198.51.100.7", excluded="198.51.100.200", dns="192.0.2.53"),
    6: dict(host=HOST_V6, peer=PEER_V6, service="2001:db8:ffff::7", excluded="2001:db8:fffe::9",
            dns="2001:db8::53"),
}

# REDIRECT inbound, everything outbound, DNS capture, an excluded owner group, dual stack.
REDIRECT_DNS = dict(
    inbound_ports_include=["*"], inbound_ports_exclude=["8081"],
    outbound_ip_ranges_include=["*"], outbound_ip_ranges_exclude=["198.51.100.128/25", "2001:db8:fffe::/48"],
    outbound_ports_exclude=["8443"], owner_groups_exclude=[str(OTHER_GROUP)],
    redirect_dns=True, dns_servers_v4=["192.0.2.53"], dns_servers_v6=["2001:db8::53"],
    enable_inbound_ipv6=True)

# TPROXY inbound on a port list, outbound by CIDR include list, only one owner group, dual stack.
TPROXY_GROUPS = dict(
    inbound_interception_mode="TPROXY", inbound_ports_include=["8080"],
    outbound_ip_ranges_include=["198.51.100.0/24", "2001:db8:ffff::/48"], owner_groups_include=[str(APP)],
    enable_inbound_ipv6=True)


def add_peer_addresses(peer):
    """The peer's services and excluded addresses (on lo) and resolvers (on eth0) of the topology above."""
    for addr in ("198.51.100.7/32", "198.51.100.200/32"):
        peer.run(["ip", "addr", "add", addr, "dev", "lo"])
    for addr in ("2001:db8:ffff::7/128", "2001:db8:fffe::9/128"):
        peer.run(["ip", "addr", "add", addr, "dev", "lo", "nodad"])
    peer.run(["ip", "addr", "add", "192.0.2.53/32", "dev", "eth0"])
    peer.run(["ip", "addr", "add", "2001:db8::53/128", "dev", "eth0", "nodad"])


def build(topo):
    """(host, peer) of the topology above, with the TPROXY routes on the host."""
    host, peer = topo.host_and_peer()
    add_peer_addresses(peer)
    ok(run_module("routes", dict(enable_inbound_ipv6=True), netns=host))
    return host, peer


def _expect(banner, **fields):
    return dict(fields, banner=banner)


def redirect_dns_checks():
    """[(probe, namespace 'host'|'peer' it runs in, expected)] for REDIRECT_DNS."""
    checks = []
    for family in (4, 6):
        a = ADDR[family]
        service = fmt_addr(a["service"], 80)
        checks += [
            # outbound: apps land on Envoy with the original destination ...
            (dict(proto="tcp", dst=a["service"], port=80, uid=APP, gid=APP), "host",
             _expect("host:15001", orig_dst=service)),
            # ... the proxy (uid or gid), an excluded group, CIDR or port do not.
            (dict(proto="tcp", dst=a["service"], port=80, uid=PROXY, gid=APP), "host",
             _expect("peer:80", local=service)),
            (dict(proto="tcp", dst=a["service"], port=80, uid=APP, gid=PROXY), "host",
             _expect("peer:80", local=service)),
            (dict(proto="tcp", dst=a["service"], port=80, uid=APP, gid=OTHER_GROUP), "host",
             _expect("peer:80", local=service)),
            (dict(proto="tcp", dst=a["excluded"], port=80, uid=APP, gid=APP), "host",
             _expect("peer:80", local=fmt_addr(a["excluded"], 80))),
            (dict(proto="tcp", dst=a["service"], port=8443, uid=APP, gid=APP), "host",
             _expect("peer:8443", local=fmt_addr(a["service"], 8443))),
            # DNS: apps reach the agent, the agent (proxy uid) the resolver.
            (dict(proto="udp", dst=a["dns"], port=53, uid=APP, gid=APP), "host", _expect("host:15053")),
            (dict(proto="tcp", dst=a["dns"], port=53, uid=APP, gid=APP), "host",
             _expect("host:15053", orig_dst=fmt_addr(a["dns"], 53))),
            (dict(proto="udp", dst=a["dns"], port=53, uid=PROXY, gid=PROXY), "host",
             _expect("peer:53", local=fmt_addr(a["dns"], 53))),
            (dict(proto="tcp", dst=a["dns"], port=53, uid=PROXY, gid=PROXY), "host",
             _expect("peer:53", local=fmt_addr(a["dns"], 53))),
            # inbound: REDIRECT to 15006 but for the excluded and the tunnel port.
            (dict(proto="tcp", dst=a["host"], port=8080), "peer",
             _expect("host:15006", orig_dst=fmt_addr(a["host"], 8080))),
            (dict(proto="tcp", dst=a["host"], port=8081), "peer",
             _expect("host:8081", local=fmt_addr(a["host"], 8081))),
            (dict(proto="tcp", dst=a["host"], port=15008), "peer",
             _expect("host:15008", local=fmt_addr(a["host"], 15008))),
        ]
    return checks


def tproxy_groups_checks():
    """[(probe, namespace, expected)] for TPROXY_GROUPS."""
    checks = []
    for family in (4, 6):
        a = ADDR[family]
        service = fmt_addr(a["service"], 80)
        checks += [
            # inbound: TPROXY keeps the original destination as the local address.
            (dict(proto="tcp", dst=a["host"], port=8080), "peer",
             _expect("host:15006", local=fmt_addr(a["host"], 8080))),
            (dict(proto="tcp", dst=a["host"], port=8081), "peer",
             _expect("host:8081", local=fmt_addr(a["host"], 8081))),
            # outbound: only the included group, only the included ranges.
            (dict(proto="tcp", dst=a["service"], port=80, uid=APP, gid=APP), "host",
             _expect("host:15001", orig_dst=service)),
            (dict(proto="tcp", dst=a["service"], port=80, uid=APP, gid=OTHER_GROUP), "host",
             _expect("peer:80", local=service)),
            (dict(proto="tcp", dst=a["peer"], port=80, uid=APP, gid=APP), "host",
             _expect("peer:80", local=fmt_addr(a["peer"], 80))),
        ]
    return checks


CHECKS = {"redirect-dns": (REDIRECT_DNS, redirect_dns_checks), "tproxy-groups": (TPROXY_GROUPS, tproxy_groups_checks)}


def _host_listeners():
    tcp, udp = [], []
    for family in (4, 6):
        tcp.append(listener(15001, family, "host:15001"))
        tcp.append(listener(15006, family, "host:15006", transparent=True))
        # The agent runs as the proxy user (the conntrack zone rules match it).
        tcp.append(listener(15053, family, "host:15053", uid=PROXY, gid=PROXY))
        udp.append(listener(15053, family, "host:15053", uid=PROXY, gid=PROXY))
        for port in (8080, 8081, 15008):
            tcp.append(listener(port, family, "host:%d" % port))
    return tcp, udp


def _peer_listeners():
    tcp = [listener(port, family, "peer:%d" % port) for family in (4, 6) for port in (53, 80, 8443)]
    udp = [listener(53, family, "peer:53") for family in (4, 6)]
    return tcp, udp


def landing(result):
    if not result["ok"]:
        return "no answer (%s)" % result["error"]
    return "%s (local %s, original destination %s)" % (result["banner"], result["local"], result["orig_dst"])


def misrouted(host, peer, checks):
    """The checks whose probe did not land as expected, as readable lines."""
    spaces = {"host": host, "peer": peer}
    with Listeners(host, *_host_listeners()), Listeners(peer, *_peer_listeners()):
        results = {}
        for where in ("host", "peer"):
            probes = [probe for probe, ns, expected in checks if ns == where]
            results[where] = iter(run_probes(spaces[where], probes)) if probes else iter(())
        got = [next(results[ns]) for probe, ns, expected in checks]
    wrong = []
    for (probe, ns, expected), result in zip(checks, got):
        if not result["ok"] or any(result.get(k) != v for k, v in expected.items()):
            wrong.append("from %s %s: expected %s, got %s" % (ns, probe, expected, landing(result)))
    return wrong


def assert_steers(host, peer, checks, what=""):
    wrong = misrouted(host, peer, checks)
    assert not wrong, "%s%d of %d probes landed elsewhere:\n%s" % (
        what + ": " if what else "", len(wrong), len(checks), "\n".join(wrong))


def apply_release(host, tmp_path, release, backend, options, **extra):
    """Apply options for release with backend (rules module, state present); the result."""
    return apply(host, tmp_path, backend=backend, istio_version=release, **dict(options, **extra))


def releases_unsupported_reason():
    """Why the rules module cannot render per release yet, or None."""
    result = run_module("rules", dict(state="rendered", istio_version="1.28", backend="nftables",
                                      inbound_ports_include=["*"]))
    msg = result.get("msg") or ""
    if result.get("failed") and "istio_version" in msg:
        return "the rules module has no istio_version option yet: %s" % msg
    return None
