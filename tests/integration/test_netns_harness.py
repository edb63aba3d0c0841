"""Self-test of tests/netns.py: namespaces come and go, the veth topology
carries IPv4 and IPv6, and the probes see where NAT and TPROXY sent them."""

import os

import pytest

import netns
from netns import (HOST_V4, HOST_V6, PEER_V4, PEER_V6, fmt_addr, tcp_connect, tcp_listener, udp_dns_listener,
                   udp_query)

pytestmark = pytest.mark.netns

FAMILIES = {
    4: {"iptables": "iptables-nft", "host": HOST_V4, "peer": PEER_V4, "ip": "-4",
        "range": "198.51.100.0/24", "service": "198.51.100.7", "dns": "203.0.113.53"},
    6: {"iptables": "ip6tables-nft", "host": HOST_V6, "peer": PEER_V6, "ip": "-6",
        "range": "2001:db8:ffff::/48", "service": "2001:db8:ffff::7", "dns": "2001:db8:53::53"},
}


def netns_names():
    return set(netns.run(["ip", "netns", "list"]).stdout.split())


def test_namespace_lifecycle(netns_factory):
    ns = netns_factory("life")
    assert ns.name.startswith(netns.PREFIX) and ns.name in netns_names()
    assert ns.netns_id() != os.readlink("/proc/self/ns/net")
    assert "UP" in ns.run(["ip", "-o", "link", "show", "lo"]).stdout
    sleeper = ns.popen(["sleep", "60"])
    ns.delete()
    assert sleeper.returncode is not None, "delete() must kill what runs inside"
    assert not ns.exists() and ns.name not in netns_names()
    ns.delete()  # idempotent


def test_topology_deletes_everything_on_error():
    with pytest.raises(RuntimeError), netns.Topology() as topo:
        names = [topo.netns("a").name, topo.netns("b").name]
        raise RuntimeError("test body failed")
    assert not netns_names() & set(names)


def test_sysctl(netns_factory):
    ns = netns_factory("sysctl")
    ns.sysctl("net.ipv4.ip_forward", 1)
    assert ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"


@pytest.mark.parametrize("family", [4, 6])
def test_veth_round_trip(host_and_peer, family):
    host, peer = host_and_peer
    fam = FAMILIES[family]
    with tcp_listener(peer, 8080, family, banner="APP") as listener:
        answer = tcp_connect(host, fam["peer"], 8080, uid=1337, gid=1337)
        report = listener.result()
    assert answer["ok"], answer
    assert answer["banner"] == "APP"
    assert answer["local"] == fmt_addr(fam["peer"], 8080)
    assert answer["peer"] == answer["client"] and answer["client"].startswith(fmt_addr(fam["host"], ""))
    assert report == {"connections": [{k: answer[k] for k in ("banner", "peer", "local", "orig_dst")}],
                      "timed_out": False}

    with udp_dns_listener(peer, 5353, family) as listener:
        answer = udp_query(host, fam["peer"], 5353, payload="hello")
        report = listener.result()
    assert answer["ok"], answer
    assert (answer["banner"], answer["query"], answer["local"]) == ("UDP5353", "hello", fmt_addr(fam["peer"], 5353))
    assert report["datagrams"][0]["peer"] == answer["client"]


def test_refused_and_timeouts_are_reported(host_and_peer):
    host, peer = host_and_peer
    assert "ConnectionRefused" in tcp_connect(host, PEER_V4, 9)["error"]
    with tcp_listener(peer, 8080, count=2, timeout=1) as listener:
        tcp_connect(host, PEER_V4, 8080)
        report = listener.result()
    assert report["timed_out"] and len(report["connections"]) == 1


@pytest.mark.parametrize("family", [4, 6])
def test_redirect_reports_original_destination(host_and_peer, family):
    """istio-style REDIRECT in the host's nat OUTPUT: root's traffic lands on
    15001 with SO_ORIGINAL_DST intact, uid 1337 (the proxy) goes out to the
    real service; DNS to port 53 lands on 15053 and the reply is un-NATed."""
    host, peer = host_and_peer
    fam = FAMILIES[family]
    peer.run(["ip", fam["ip"], "addr", "add", fam["service"], "dev", "lo"])
    tables = [fam["iptables"], "-t", "nat", "-A", "OUTPUT"]
    host.run([*tables, "-p", "tcp", "-m", "owner", "--uid-owner", "1337", "-j", "RETURN"])
    host.run([*tables, "-p", "tcp", "-d", fam["range"], "-j", "REDIRECT", "--to-ports", "15001"])
    host.run([*tables, "-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", "15053"])

    with tcp_listener(host, 15001, family, banner="OUTBOUND15001") as outbound, \
            tcp_listener(peer, 80, family, banner="APP") as app:
        captured = tcp_connect(host, fam["service"], 80)
        bypassed = tcp_connect(host, fam["service"], 80, uid=1337, gid=1337)
        assert outbound.result()["connections"][0]["orig_dst"] == fmt_addr(fam["service"], 80)
        assert app.result()["connections"][0]["local"] == fmt_addr(fam["service"], 80)
    assert captured["ok"] and captured["banner"] == "OUTBOUND15001", captured
    assert captured["orig_dst"] == fmt_addr(fam["service"], 80)
    assert bypassed["ok"] and bypassed["banner"] == "APP", bypassed

    with udp_dns_listener(host, 15053, family, banner="DNS15053") as dns:
        answer = udp_query(host, fam["dns"], 53)
        assert dns.result()["datagrams"][0]["local"] == fmt_addr("127.0.0.1" if family == 4 else "::1", 15053)
    assert answer["ok"] and answer["banner"] == "DNS15053", answer


@pytest.mark.parametrize("family", [4, 6])
def test_tproxy_transparent_listener(host_and_peer, family):
    """Inbound TPROXY in the host: the peer's connection to a foreign address
    lands on a transparent 15006 listener that sees it as the destination."""
    host, peer = host_and_peer
    fam = FAMILIES[family]
    host.run(["ip", fam["ip"], "rule", "add", "fwmark", "1337", "lookup", "133"])
    host.run(["ip", fam["ip"], "route", "add", "local", "default", "dev", "lo", "table", "133"])
    host.run([fam["iptables"], "-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-d", fam["range"],
              "-j", "TPROXY", "--on-port", "15006", "--tproxy-mark", "1337"])
    with tcp_listener(host, 15006, family, transparent=True, banner="INBOUND15006") as inbound:
        answer = tcp_connect(peer, fam["service"], 8443)
        inbound.result()
    assert answer["ok"] and answer["banner"] == "INBOUND15006", answer
    assert answer["orig_dst"] == answer["local"] == fmt_addr(fam["service"], 8443)
    assert answer["peer"] == answer["client"]
