"""Real traffic through the capture rules (meshcapture.sidecar.rules).

Topology (tests/netns.py): host 192.0.2.10 / 2001:db8::10 and peer
192.0.2.20 / 2001:db8::20 joined by veth, each routing everything via the
other.  The peer also holds the "remote" addresses: services 198.51.100.7 /
2001:db8:ffff::7 and excluded ones 198.51.100.200 / 2001:db8:fffe::9 (on
lo), the DNS servers 192.0.2.53 / 2001:db8::53 (on eth0).  Listeners stand
in for Envoy inside the host (15001 outbound, 15006 inbound, 15053 the
agent's DNS proxy, which runs as the proxy uid 1337 like pilot-agent) and
for the apps and the real resolver on the peer.
"""

import pytest

import netns
import release_traffic
from netns import HOST_V4, HOST_V6, fmt_addr, tcp_connect, tcp_listener, udp_dns_listener, udp_query
from rules_helpers import apply, ok

pytestmark = pytest.mark.netns

# The same probes and expected landing places for every backend.
BACKENDS = ["iptables-nft", "nftables"]

APP_UID = 1000
PROXY_UID = 1337

ADDR = {
    4: dict(host=HOST_V4, service="198.51.100.7", excluded="198.51.100.200", dns="192.0.2.53"),
    6: dict(host=HOST_V6, service="2001:db8:ffff::7", excluded="2001:db8:fffe::9", dns="2001:db8::53"),
}

CAPTURE = dict(
    inbound_ports_include=["*"], inbound_ports_exclude=["8081"],
    outbound_ip_ranges_include=["*"], outbound_ip_ranges_exclude=["198.51.100.128/25", "2001:db8:fffe::/48"],
    outbound_ports_exclude=["8443"],
    redirect_dns=True, dns_servers_v4=["192.0.2.53"], dns_servers_v6=["2001:db8::53"],
    enable_inbound_ipv6=True,
)


def build(topo):
    """(host, peer) with the peer's addresses of tests/release_traffic.py, no policy routing on the host."""
    host, peer = topo.host_and_peer()
    release_traffic.add_peer_addresses(peer)
    return host, peer


@pytest.fixture(scope="module", params=BACKENDS)
def captured(request, tmp_path_factory):
    """(host, peer) with CAPTURE applied on the host, with each backend."""
    with netns.Topology() as topo:
        host, peer = build(topo)
        result = ok(apply(host, tmp_path_factory.mktemp("traffic"), backend=request.param, **CAPTURE))
        assert result["backend"] == request.param
        assert result["changed"] is True
        yield host, peer


def connect(listener_ns, port, family, client_ns, dst, *, banner, transparent=False, listener_uid=None, **client):
    """Start a listener (as listener_uid), connect, return (client answer, listener report)."""
    with tcp_listener(listener_ns, port, family, banner=banner, transparent=transparent, timeout=10,
                      uid=listener_uid, gid=listener_uid) as listener:
        answer = tcp_connect(client_ns, dst, client.pop("dport", port), timeout=3, **client)
        report = listener.result(timeout=15) if answer["ok"] else None
    return answer, report


FAMILY = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


# ----------------------------------------------------------------- outbound
@FAMILY
def test_outbound_lands_on_15001_with_original_destination(captured, family):
    host, peer = captured
    a = ADDR[family]
    answer, report = connect(host, 15001, family, host, a["service"], dport=80, banner="OUTBOUND", uid=APP_UID,
                             gid=APP_UID)
    assert answer["ok"], answer
    assert answer["banner"] == "OUTBOUND"
    assert answer["orig_dst"] == fmt_addr(a["service"], 80)
    assert report["connections"][0]["orig_dst"] == fmt_addr(a["service"], 80)


@FAMILY
@pytest.mark.parametrize("who", [dict(uid=PROXY_UID, gid=PROXY_UID), dict(uid=APP_UID, gid=PROXY_UID)],
                         ids=["proxy-uid", "proxy-gid"])
def test_proxy_traffic_is_not_captured(captured, family, who):
    host, peer = captured
    a = ADDR[family]
    answer, dummy = connect(peer, 80, family, host, a["service"], banner="SERVICE", **who)
    assert answer["ok"], answer
    assert answer["banner"] == "SERVICE"
    assert answer["local"] == fmt_addr(a["service"], 80)


@FAMILY
@pytest.mark.parametrize("what", ["excluded-cidr", "excluded-port"])
def test_excluded_outbound_is_not_captured(captured, family, what):
    host, peer = captured
    a = ADDR[family]
    dst, port = (a["excluded"], 80) if what == "excluded-cidr" else (a["service"], 8443)
    answer, dummy = connect(peer, port, family, host, dst, banner="REMOTE", uid=APP_UID, gid=APP_UID)
    assert answer["ok"], answer
    assert answer["banner"] == "REMOTE"
    assert answer["local"] == fmt_addr(dst, port)


# ------------------------------------------------------------------ inbound
@FAMILY
def test_inbound_lands_on_15006_with_original_destination(captured, family):
    host, peer = captured
    a = ADDR[family]
    answer, report = connect(host, 15006, family, peer, a["host"], dport=8080, banner="INBOUND")
    assert answer["ok"], answer
    assert answer["banner"] == "INBOUND"
    assert answer["orig_dst"] == fmt_addr(a["host"], 8080)


@FAMILY
@pytest.mark.parametrize("port", [8081, 15008], ids=["excluded-port", "tunnel-port"])
def test_inbound_excluded_port_reaches_the_app(captured, family, port):
    host, peer = captured
    a = ADDR[family]
    answer, dummy = connect(host, port, family, peer, a["host"], banner="APP")
    assert answer["ok"], answer
    assert answer["banner"] == "APP"
    assert answer["local"] == fmt_addr(a["host"], port)


# ---------------------------------------------------------------------- DNS
@FAMILY
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_from_apps_reaches_the_agent(captured, family, proto):
    host, peer = captured
    a = ADDR[family]
    # The agent runs as the proxy user: its UDP answers must match the
    # conntrack zone rules (--sport 15053 -m owner --uid-owner 1337).
    if proto == "udp":
        with udp_dns_listener(host, 15053, family, banner="AGENT", timeout=10, uid=PROXY_UID, gid=PROXY_UID):
            answer = udp_query(host, a["dns"], 53, uid=APP_UID, gid=APP_UID, timeout=3)
    else:
        answer, dummy = connect(host, 15053, family, host, a["dns"], dport=53, banner="AGENT",
                                listener_uid=PROXY_UID, uid=APP_UID, gid=APP_UID)
    assert answer["ok"], answer
    assert answer["banner"] == "AGENT"
    assert answer["local"] == fmt_addr("127.0.0.1" if family == 4 else "::1", 15053)
    if proto == "tcp":
        assert answer["orig_dst"] == fmt_addr(a["dns"], 53)


@FAMILY
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_from_the_proxy_reaches_the_resolver(captured, family, proto):
    host, peer = captured
    a = ADDR[family]
    if proto == "udp":
        with udp_dns_listener(peer, 53, family, banner="RESOLVER", timeout=10):
            answer = udp_query(host, a["dns"], 53, uid=PROXY_UID, gid=PROXY_UID, timeout=3)
    else:
        answer, dummy = connect(peer, 53, family, host, a["dns"], banner="RESOLVER", uid=PROXY_UID, gid=PROXY_UID)
    assert answer["ok"], answer
    assert answer["banner"] == "RESOLVER"
    assert answer["local"] == fmt_addr(a["dns"], 53)


# ------------------------------------------------------ other inbound modes
@FAMILY
@pytest.mark.parametrize("backend", BACKENDS)
def test_inbound_port_list(topology, tmp_path, family, backend):
    """inbound_ports_include ['8080']: 8080 lands on 15006, 8081 reaches the app."""
    host, peer = build(topology)
    ok(apply(host, tmp_path, backend=backend, inbound_ports_include=["8080"], enable_inbound_ipv6=True))
    a = ADDR[family]
    answer, dummy = connect(host, 15006, family, peer, a["host"], dport=8080, banner="INBOUND")
    assert answer["ok"] and answer["banner"] == "INBOUND", answer
    assert answer["orig_dst"] == fmt_addr(a["host"], 8080)
    answer, dummy = connect(host, 8081, family, peer, a["host"], banner="APP")
    assert answer["ok"] and answer["banner"] == "APP", answer


@FAMILY
@pytest.mark.parametrize("backend", BACKENDS)
def test_inbound_tproxy(topology, tmp_path, family, backend):
    """TPROXY (with meshcapture.sidecar.routes for the mark's local route): the
    transparent 15006 listener sees the original destination as its local
    address; excluded ports reach the app."""
    host, peer = release_traffic.build(topology)
    ok(apply(host, tmp_path, backend=backend, inbound_interception_mode="TPROXY", inbound_ports_include=["*"],
             inbound_ports_exclude=["8081"], enable_inbound_ipv6=True))
    a = ADDR[family]
    answer, dummy = connect(host, 15006, family, peer, a["host"], dport=8080, banner="INBOUND", transparent=True)
    assert answer["ok"] and answer["banner"] == "INBOUND", answer
    assert answer["local"] == fmt_addr(a["host"], 8080)
    answer, dummy = connect(host, 8081, family, peer, a["host"], banner="APP")
    assert answer["ok"] and answer["banner"] == "APP", answer


# ------------------------------------------------------------- per release
# Every Istio release the module renders (istio_version), with both
# backends (nftables: Istio's native tables from 1.27, the named-set layout
# before): REDIRECT with DNS capture and owner groups, and TPROXY with an
# include list, both dual stack, applied by the module and probed with real
# connections (tests/release_traffic.py has the configurations, the probes
# and where each must land).
@pytest.fixture(scope="module")
def releases_supported():
    reason = release_traffic.releases_unsupported_reason()
    if reason:
        pytest.skip(reason)


def _release_param(release, backend, check):
    return pytest.param(release, backend, check, id="%s-%s-%s" % (release, backend, check))


RELEASE_PARAMS = [_release_param(release, backend, check) for release in release_traffic.RELEASES
                  for backend in release_traffic.BACKENDS for check in release_traffic.CHECKS]


@pytest.mark.parametrize("release, backend, check", RELEASE_PARAMS)
def test_release_capture_steers_real_traffic(releases_supported, topology, tmp_path, release, backend, check):
    host, peer = release_traffic.build(topology)
    options, checks = release_traffic.CHECKS[check]
    result = release_traffic.apply_release(host, tmp_path, release, backend, options)
    ok(result)
    assert result["backend"] == backend and result["changed"] is True
    if backend == "nftables" and release >= "1.27":
        assert result["restore"]["nft"].startswith("add table inet istio-proxy-nat\n"), \
            "Istio's native layout expected from 1.27 on"
    release_traffic.assert_steers(host, peer, checks(), "Istio %s, %s" % (release, backend))
    again = ok(release_traffic.apply_release(host, tmp_path, release, backend, options))
    assert again["changed"] is False, "a second run changed something: %s" % again.get("added")
